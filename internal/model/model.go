// Package model holds banger's persistent records: images, kernels and VMs.
// They are stored as JSON by package store, so field names are part of the
// on-disk format. A VM's runtime is composed of the records of the
// packages that make its resources (vmm.Handle, blockdev.Disk,
// netctl.TapRef), which therefore sit below this package.
package model

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/mounts"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/portfwd"
	"github.com/bangerdev/banger/internal/vmm"
)

// NewID returns a random 24-hex-digit id, for images and VMs.
func NewID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Image is a published root filesystem, ready to boot.
type Image struct {
	ID      string         `json:"id"`
	Name    string         `json:"name"`
	Ref     string         `json:"ref,omitempty"`    // OCI reference or catalog entry it came from
	Source  string         `json:"source"`           // "oci", "catalog" or "import"
	Digest  string         `json:"digest,omitempty"` // manifest digest for OCI images
	Dir     string         `json:"dir"`              // <state>/images/<id>
	RootFS  string         `json:"rootfs"`           // absolute path of rootfs.ext4
	Size    int64          `json:"size"`             // apparent size of rootfs.ext4 in bytes
	Kernel  string         `json:"kernel,omitempty"` // kernel record name staged beside the image
	Boot    *BootArtifacts `json:"boot,omitempty"`
	Layers  []string       `json:"layers,omitempty"` // layer blob digests, for cache pruning
	Managed bool           `json:"managed"`
	// OwnerUID is who pulled the image; only they or root may replace it
	// (records from before owners were kept read 0: root's).
	OwnerUID uint32    `json:"owner_uid,omitempty"`
	Created  time.Time `json:"created"`
	Notes    []string  `json:"notes,omitempty"` // e.g. "published without boot artifacts"
	// Config is the OCI run configuration (Entrypoint, Cmd, Env, WorkingDir,
	// User, ExposedPorts) banger's PID 1 runs as the main process.
	Config *guestabi.ImageConfig `json:"config,omitempty"`
	// Init is the init VMs of the image get with --init auto (image or
	// banger), and InitReason why; empty for images pulled by an older
	// banger, which have no banger PID 1 inside.
	Init       guestabi.Init `json:"init,omitempty"`
	InitReason string        `json:"init_reason,omitempty"`
}

// BootArtifacts is the kernel triple staged beside an image.
type BootArtifacts struct {
	Kernel  string `json:"kernel"`            // path of the kernel image
	Initrd  string `json:"initrd,omitempty"`  // path of the initrd
	Modules string `json:"modules,omitempty"` // path of lib/modules/<version>
	Version string `json:"version,omitempty"`
}

// Kernel is a kernel known to banger.
type Kernel struct {
	Name      string    `json:"name"`
	Version   string    `json:"version"`
	Arch      string    `json:"arch"`
	Format    string    `json:"format"` // "bzImage" or "vmlinux"
	Dir       string    `json:"dir"`
	Kernel    Artifact  `json:"kernel"`
	Initrd    *Artifact `json:"initrd,omitempty"`
	Modules   *Artifact `json:"modules,omitempty"` // Path is the lib/modules/<version> dir; SHA256 covers a manifest of the tree
	Source    string    `json:"source"`            // "catalog" or "import"
	SourceRef string    `json:"source_ref,omitempty"`
	OwnerUID  uint32    `json:"owner_uid,omitempty"` // who imported or pulled it (see Image.OwnerUID)
	Created   time.Time `json:"created"`
}

// Artifact is one file (or tree) with its digest.
type Artifact struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
}

// VMState is where a VM is in its lifecycle.
type VMState string

// The VM states.
const (
	VMCreated  VMState = "created"
	VMStarting VMState = "starting"
	VMRunning  VMState = "running"
	VMStopping VMState = "stopping"
	VMStopped  VMState = "stopped"
	VMError    VMState = "error"
)

// VM is one developer VM.
type VM struct {
	ID            string    `json:"id"`
	Name          string    `json:"name"`
	OwnerUID      uint32    `json:"owner_uid"`
	Image         string    `json:"image"` // image name
	ImageID       string    `json:"image_id"`
	Kernel        string    `json:"kernel"` // kernel name
	CPUs          int       `json:"cpus"`
	MemoryMiB     int       `json:"memory_mib"`
	DiskBytes     int64     `json:"disk_bytes"`
	VMM           string    `json:"vmm"`         // "firecracker" or "qemu"
	DiskDriver    string    `json:"disk_driver"` // "dm-snapshot", "reflink" or "copy"
	IP            string    `json:"ip,omitempty"`
	MAC           string    `json:"mac,omitempty"`
	State         VMState   `json:"state"`
	Reason        string    `json:"reason,omitempty"` // why the VM is in VMError
	Created       time.Time `json:"created"`
	StartedAt     time.Time `json:"started_at,omitzero"`
	StoppedAt     time.Time `json:"stopped_at,omitzero"`
	Runtime       Runtime   `json:"runtime"`
	Recovery      Recovery  `json:"recovery,omitzero"`
	FirstBoot     string    `json:"first_boot,omitempty"`     // pending, running, done, failed (from the agent)
	FirstBootLog  []string  `json:"first_boot_log,omitempty"` // last lines of the first-boot log, kept when it failed
	HostKey       string    `json:"host_key,omitempty"`       // pinned SSH host key, "ssh-ed25519 AAAA..."
	SSHKey        string    `json:"ssh_key,omitempty"`        // the owner's public key, authorized for root in the guest
	KernelCmdline string    `json:"kernel_cmdline,omitempty"`
	// Init is the init asked for (vm create --init; empty means auto), Cmd
	// and Env the main-process overrides (--cmd, --env).
	Init guestabi.Init `json:"init,omitempty"`
	Cmd  []string      `json:"cmd,omitempty"`
	Env  []string      `json:"env,omitempty"`
	// InitRan is the init the guest reported at its last boot, and Main
	// banger's PID 1's last report of the main process (from the agent).
	InitRan guestabi.Init       `json:"init_ran,omitempty"`
	Main    *guestabi.MainState `json:"main,omitempty"`
	// Ports are the published ports (vm create -p), each with the host
	// port chosen at create; opened whenever the VM runs.
	Ports []portfwd.Spec `json:"ports,omitempty"`
	// RestoredFrom is the id of the snapshot the VM was last started from.
	RestoredFrom string `json:"restored_from,omitempty"`
	// Mounts are the host folders (vm create --mount), mounted in the
	// guest whenever the VM runs.
	Mounts []mounts.Spec `json:"mounts,omitempty"`
}

// Runtime is what a started VM holds on the host, composed of its parts as
// the packages that make them define them: the VM monitor's handle, the
// disk and the tap. It mirrors the teardown identity in the VM's
// handles.json so that cleanup works when that file is missing or corrupt.
// Parts are written before the resource is created (intent) and confirmed
// after.
type Runtime struct {
	Phase      string `json:"phase,omitempty"` // last intent recorded, e.g. "tap:creating"
	RuntimeDir string `json:"runtime_dir,omitempty"`
	ConsoleLog string `json:"console_log,omitempty"`
	// Monitor is the VM monitor process, its sockets and how to reach the
	// guest agent.
	Monitor vmm.Handle `json:"monitor,omitzero"`
	// Disk is the disk the VM boots and what backs it (loops, dm device,
	// COW file).
	Disk blockdev.Disk `json:"disk,omitzero"`
	// Tap is the VM's network device on the bridge.
	Tap netctl.TapRef `json:"tap,omitzero"`
}

// LoopDev is a loop device and the file behind it.
type LoopDev = blockdev.Loop

// Empty reports whether the runtime holds nothing to tear down: no
// monitor, no disk, no tap and no runtime dir (the phase and the console
// log name no resource).
func (r Runtime) Empty() bool {
	return r.RuntimeDir == "" && reflect.ValueOf(r.Monitor).IsZero() && reflect.ValueOf(r.Disk).IsZero() && r.Tap == (netctl.TapRef{})
}

// SameIdentity reports whether r and o name the same teardown identity:
// every field, the monitor's, the disk's and the tap's included.
// TestSameIdentityChecksEveryField fails when a field is added to Runtime
// or its parts and not compared here.
func (r Runtime) SameIdentity(o Runtime) bool {
	a, b := r.Monitor, o.Monitor
	d, e := r.Disk, o.Disk
	return r.Phase == o.Phase && r.RuntimeDir == o.RuntimeDir && r.ConsoleLog == o.ConsoleLog &&
		a.PID == b.PID && a.PIDStart == b.PIDStart && a.BootID == b.BootID && slices.Equal(a.Cmdline, b.Cmdline) &&
		a.APISocket == b.APISocket && a.AgentSocket == b.AgentSocket && a.AgentTransport == b.AgentTransport && a.AgentCID == b.AgentCID &&
		a.ConsoleSocket == b.ConsoleSocket && a.ConsoleFIFO == b.ConsoleFIFO && a.ConsoleLog == b.ConsoleLog && a.ConsoleLogMax == b.ConsoleLogMax && a.Jail == b.Jail &&
		d.Driver == e.Driver && d.Path == e.Path && d.COWPath == e.COWPath && d.BaseLink == e.BaseLink &&
		slices.Equal(d.Loops, e.Loops) && d.DMName == e.DMName && d.DMUUID == e.DMUUID &&
		r.Tap == o.Tap
}

// Recovery records what the daemon did for the VM at its last start-up.
type Recovery struct {
	ReadoptedAt time.Time `json:"readopted_at,omitzero"`
	CleanedAt   time.Time `json:"cleaned_at,omitzero"`
	Removed     []string  `json:"removed,omitempty"`
}

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`)

// MaxNameLen is the longest image, kernel or VM name.
const MaxNameLen = 63

// ValidateName checks an image, kernel or VM name: lowercase letters,
// digits, '.', '_' and '-', starting with a letter or digit, at most
// MaxNameLen bytes.
func ValidateName(kind, name string) error {
	if name == "" {
		return fmt.Errorf("%s name is empty", kind)
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("%s name %q is %d bytes long; the limit is %d", kind, name, len(name), MaxNameLen)
	}
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%s name %q is invalid: use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit", kind, name)
	}
	if LooksLikeID(name) {
		return fmt.Errorf("%s name %q is invalid: 24 hex digits is the form of an id; choose a name that is not", kind, name)
	}
	return nil
}
