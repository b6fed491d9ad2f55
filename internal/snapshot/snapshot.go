// Package snapshot keeps banger's VM snapshots: a running VM saved whole
// (the VM monitor's memory and device state, plus the disk as it was at
// that instant) in a directory of its own under the state dir, and the
// restores that bring such a save back as a VM.
//
// Each snapshot lives in <dir>/<id>/ with its record, snapshot.json. The
// record is written, in phase "creating", before any other file; it moves
// to "ready" only once every file is written, synced and checksummed, so a
// half-written snapshot is never listed, and Reconcile removes it (and
// names the VM it came from, which may have been left paused). A restore
// verifies every file's SHA-256 and refuses a snapshot made by another VM
// monitor, or under KVM on a CPU with other features, before it starts
// anything.
//
// The package does not authorize: the daemon checks that the caller owns
// the snapshot (Snapshot.Owner) as it does for VMs.
package snapshot

import (
	"errors"
	"fmt"
	"regexp"
	"time"
)

// Phases of a snapshot record.
const (
	// PhaseCreating: the record is written, the files may be partial.
	PhaseCreating = "creating"
	// PhaseReady: every file is whole and its checksum recorded.
	PhaseReady = "ready"
	// PhaseDeleting: the files are being removed.
	PhaseDeleting = "deleting"
)

// File roles.
const (
	RoleState = "state" // the VM monitor's files (memory and devices)
	RoleDisk  = "disk"  // the root disk at the instant of the snapshot
)

// DiskFileName is the disk copy's name in a snapshot dir.
const DiskFileName = "disk.img"

// RecordName is the record's name in a snapshot dir.
const RecordName = "snapshot.json"

// Sentinel errors. Test with errors.Is.
var (
	ErrNotFound     = errors.New("snapshot not found")
	ErrExists       = errors.New("a snapshot of that name already exists")
	ErrCorrupt      = errors.New("snapshot file failed its checksum")
	ErrIncompatible = errors.New("snapshot cannot be restored on this host")
	ErrInvalidName  = errors.New("invalid snapshot name")
	ErrHasMounts    = errors.New("the VM has mounted host folders")
	ErrInUse        = errors.New("snapshot is in use")
)

// Snapshot is the record of one snapshot, stored as snapshot.json.
type Snapshot struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Owner     uint32    `json:"owner_uid"` // the creator's uid
	Phase     string    `json:"phase"`
	CreatedAt time.Time `json:"created_at"`
	// Source is the VM the snapshot was taken of.
	Source Source `json:"source"`
	// Machine is what a restore must recreate.
	Machine Machine `json:"machine"`
	// Files are every file of the snapshot but the record.
	Files []File `json:"files"`
	// Pause is how long the guest was paused for the snapshot.
	Pause time.Duration `json:"pause_ns"`
	// Mounts are the VM's --mount folders (HOSTDIR:GUESTDIR[:ro]) when it
	// was saved (--force). Their contents are not saved: a restore
	// re-attaches them, and the guest sees the host folders as they are
	// then; a clone gets them too.
	Mounts []string `json:"mounts,omitempty"`
}

// Source names the VM a snapshot was taken of.
type Source struct {
	VMID   string `json:"vm_id"`
	VMName string `json:"vm_name"`
}

// Machine describes the saved VM: its monitor and the hardware it had.
type Machine struct {
	Monitor        string `json:"monitor"`         // vmm backend name
	MonitorVersion string `json:"monitor_version"` // vmm.Snapshotter.Version
	Accel          string `json:"accel"`           // "kvm" or "tcg"
	// CPUFeatures is a digest of the host CPU's feature flags, recorded
	// under KVM, where the guest saw the host CPU; empty under TCG.
	CPUFeatures string   `json:"cpu_features,omitempty"`
	Kernel      string   `json:"kernel"` // the kernel file
	KernelName  string   `json:"kernel_name,omitempty"`
	Initrd      string   `json:"initrd,omitempty"`
	Cmdline     string   `json:"cmdline"`
	Image       string   `json:"image"`
	CPUs        int      `json:"cpus"`
	MemoryMiB   int      `json:"memory_mib"`
	Devices     []string `json:"devices"`
	// Identity of the saved guest; a clone replaces it.
	MAC      string `json:"mac,omitempty"`
	IP       string `json:"ip,omitempty"`
	Hostname string `json:"hostname,omitempty"`
}

// File is one file of a snapshot.
type File struct {
	Name   string `json:"name"`
	Role   string `json:"role"`
	Size   int64  `json:"size"`   // apparent size
	Blocks int64  `json:"blocks"` // bytes allocated on disk
	// SHA256 is a tree hash: the SHA-256 of the SHA-256s of the file's
	// 1 MiB chunks (holes are not read; see fileSHA256).
	SHA256 string `json:"sha256"`
}

// SizeOnDisk is the bytes the snapshot's files take on disk (holes and
// shared reflinked extents are not counted twice by the filesystem, but
// they are counted here as allocated).
func (s Snapshot) SizeOnDisk() int64 {
	var n int64
	for _, f := range s.Files {
		n += f.Blocks
	}
	return n
}

// Size is the apparent size of the snapshot's files.
func (s Snapshot) Size() int64 {
	var n int64
	for _, f := range s.Files {
		n += f.Size
	}
	return n
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// ValidateName checks a user's snapshot name.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("snapshot name %q: use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit: %w", name, ErrInvalidName)
	}
	return nil
}

var idRE = regexp.MustCompile(`^[0-9a-f]{16}$`)
