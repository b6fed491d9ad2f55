// Package doctor checks the host prerequisites banger needs and says how to
// fix what is missing.
package doctor

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/units"
	"golang.org/x/sys/unix"
)

// Status is the outcome of one check.
type Status string

// The statuses.
const (
	OK   Status = "ok"
	Warn Status = "warn"
	Fail Status = "fail"
)

// Check is one line of the doctor's report.
type Check struct {
	Name     string `json:"check"`
	Status   Status `json:"status"`
	Detail   string `json:"detail"`
	Fix      string `json:"fix,omitempty"`
	Required bool   `json:"required"`
}

// Host is what the checks look at. Tests point it at fake roots; Default
// reads the real host.
type Host struct {
	Root     string // prefix for /proc, /sys, /dev paths ("" = real root)
	LookPath func(string) (string, error)
	Run      func(ctx context.Context, name string, args ...string) (string, error) // combined output
}

// DefaultHost reads the real host.
func DefaultHost() Host {
	return Host{
		LookPath: exec.LookPath,
		Run: func(ctx context.Context, name string, args ...string) (string, error) {
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
			return string(out), err
		},
	}
}

func (h Host) path(p string) string { return filepath.Join(h.Root, p) }

func (h Host) exists(p string) bool {
	_, err := os.Stat(h.path(p))
	return err == nil
}

func (h Host) read(p string) string {
	b, _ := os.ReadFile(h.path(p))
	return string(b)
}

// KVMState says what /dev/kvm offers.
type KVMState string

// The KVM states.
const (
	KVMAbsent   KVMState = "absent"
	KVMHardware KVMState = "hardware"
	KVMPVMOnly  KVMState = "pvm-only" // /dev/kvm opens but is backed by kvm_pvm: standard guests hang
	KVMNoVirt   KVMState = "no-hw-virt"
)

// KVM classifies /dev/kvm: usable for standard guests only with hardware
// virtualization (vmx/svm in cpuinfo and kvm_intel or kvm_amd loaded).
func (h Host) KVM() (KVMState, string) {
	if !h.exists("/dev/kvm") {
		return KVMAbsent, "/dev/kvm is absent"
	}
	cpu := h.read("/proc/cpuinfo")
	hasVirt := regexp.MustCompile(`(?m)^flags\s*:.*\b(vmx|svm)\b`).MatchString(cpu)
	mods := h.read("/proc/modules")
	loaded := func(m string) bool {
		return strings.Contains("\n"+mods, "\n"+m+" ") || h.exists("/sys/module/"+m)
	}
	hwMod := loaded("kvm_intel") || loaded("kvm_amd")
	switch {
	case hasVirt && hwMod:
		return KVMHardware, "hardware virtualization (" + map[bool]string{true: "kvm_intel", false: "kvm_amd"}[loaded("kvm_intel")] + ")"
	case loaded("kvm_pvm"):
		return KVMPVMOnly, "present but PVM-only: guests will run under QEMU TCG"
	default:
		why := "no vmx/svm CPU flag"
		if hasVirt {
			why = "neither kvm_intel nor kvm_amd is loaded"
		}
		return KVMNoVirt, "present but no hardware virtualization (" + why + "): guests will run under QEMU TCG"
	}
}

// Run performs every check. stateDirs are checked for free space.
func Run(ctx context.Context, h Host, stateDir, cacheDir string) []Check {
	var cs []Check
	add := func(c Check) { cs = append(cs, c) }

	// KVM
	st, detail := h.KVM()
	kc := Check{Name: "kvm", Detail: detail}
	switch st {
	case KVMHardware:
		kc.Status = OK
	case KVMAbsent:
		kc.Status = Warn
		kc.Fix = "enable virtualization in the firmware and load kvm_intel or kvm_amd; until then guests run under QEMU TCG (slow)"
	default:
		kc.Status = Warn
		kc.Fix = "run on a host with vmx/svm and kvm_intel/kvm_amd for fast guests; QEMU TCG works meanwhile"
	}
	add(kc)

	// VM monitors
	fcPath, fcErr := h.LookPath("firecracker")
	qPath, qErr := h.LookPath("qemu-system-x86_64")
	fc := Check{Name: "firecracker", Status: Warn, Detail: "not found in PATH", Fix: "install Firecracker (https://github.com/firecracker-microvm/firecracker/releases) for the fastest VMs; QEMU is used otherwise"}
	if fcErr == nil {
		out, _ := h.Run(ctx, fcPath, "--version")
		fc.Status, fc.Detail, fc.Fix = OK, fcPath+" "+firstLine(out), ""
		if st != KVMHardware {
			fc.Status, fc.Fix = Warn, "Firecracker needs hardware KVM; QEMU will be used on this host"
		}
	}
	add(fc)
	q := Check{Name: "qemu", Status: Warn, Detail: "qemu-system-x86_64 not found in PATH", Fix: "apt-get install qemu-system-x86"}
	if qErr == nil {
		out, _ := h.Run(ctx, qPath, "--version")
		q.Status, q.Detail, q.Fix = OK, qPath+" "+firstLine(out), ""
	}
	add(q)
	if fcErr != nil && qErr != nil {
		add(Check{Name: "vmm", Status: Fail, Required: true, Detail: "neither firecracker nor qemu-system-x86_64 is installed: no VM can start", Fix: "apt-get install qemu-system-x86"})
	}

	// e2fsprogs
	add(checkE2fsprogs(ctx, h))
	dbg := Check{Name: "debugfs", Required: true, Status: Fail, Detail: "debugfs not found", Fix: "apt-get install e2fsprogs"}
	if p, err := h.LookPath("debugfs"); err == nil {
		dbg.Status, dbg.Detail, dbg.Fix = OK, p, ""
	}
	add(dbg)

	// kernel features
	add(devCheck(h, "tun", "/dev/net/tun", true, "modprobe tun"))
	add(moduleCheck(h, "bridge", "bridge", true, "modprobe bridge"))
	add(devCheck(h, "loop", "/dev/loop-control", false, "modprobe loop (needed for the dm-snapshot disk driver)"))
	dm := devCheck(h, "device-mapper", "/dev/mapper/control", false, "modprobe dm_snapshot; until then VM disks are full copies (reflink where the file system allows)")
	if dm.Status != OK {
		dm.Detail = "/dev/mapper/control is absent: VM disks use the copy fallback"
	}
	add(dm)
	vs := devCheck(h, "vhost-vsock", "/dev/vhost-vsock", false, "modprobe vhost_vsock; until then QEMU guests use a virtio-serial agent channel")
	if vs.Status != OK {
		vs.Detail = "/dev/vhost-vsock is absent: the QEMU agent channel uses virtio-serial"
	}
	add(vs)
	add(moduleCheck(h, "nftables", "nf_tables", false, "modprobe nf_tables (needed for guest NAT)"))
	fwd := Check{Name: "ip_forward", Status: Warn, Detail: "disabled", Fix: "the daemon enables net.ipv4.ip_forward when it sets up NAT; or sysctl -w net.ipv4.ip_forward=1"}
	if strings.TrimSpace(h.read("/proc/sys/net/ipv4/ip_forward")) == "1" {
		fwd.Status, fwd.Detail, fwd.Fix = OK, "enabled", ""
	}
	add(fwd)

	// free space
	for _, d := range []struct{ name, dir string }{{"state-dir space", stateDir}, {"cache-dir space", cacheDir}} {
		add(spaceCheck(d.name, d.dir))
	}
	return cs
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

func devCheck(h Host, name, dev string, required bool, fix string) Check {
	if h.exists(dev) {
		return Check{Name: name, Status: OK, Detail: dev, Required: required}
	}
	st := Warn
	if required {
		st = Fail
	}
	return Check{Name: name, Status: st, Detail: dev + " is absent", Fix: fix, Required: required}
}

func moduleCheck(h Host, name, mod string, required bool, fix string) Check {
	if h.exists("/sys/module/"+mod) || strings.Contains(h.read("/proc/modules"), mod+" ") {
		return Check{Name: name, Status: OK, Detail: "module " + mod + " loaded", Required: required}
	}
	// Not loaded yet is fine if it can be loaded on demand.
	rel := strings.TrimSpace(h.read("/proc/sys/kernel/osrelease"))
	if rel != "" {
		base := h.path(filepath.Join("/lib/modules", rel))
		found := false
		_ = filepath.WalkDir(base, func(p string, de os.DirEntry, err error) error {
			if err == nil && !de.IsDir() && strings.HasPrefix(de.Name(), mod+".ko") {
				found = true
				return filepath.SkipAll
			}
			return nil
		})
		if found {
			return Check{Name: name, Status: OK, Detail: "module " + mod + " available (loaded on demand)", Required: required}
		}
	}
	st := Warn
	if required {
		st = Fail
	}
	return Check{Name: name, Status: st, Detail: "module " + mod + " is not loaded or available", Fix: fix, Required: required}
}

var mkeVersionRE = regexp.MustCompile(`mke2fs (\d+)\.(\d+)(?:\.(\d+))?`)

func checkE2fsprogs(ctx context.Context, h Host) Check {
	c := Check{Name: "e2fsprogs", Required: true, Status: Fail, Fix: "apt-get install e2fsprogs (1.43 or newer: banger needs mkfs.ext4 -d)"}
	p, err := h.LookPath("mkfs.ext4")
	if err != nil {
		c.Detail = "mkfs.ext4 not found"
		return c
	}
	out, _ := h.Run(ctx, p, "-V")
	m := mkeVersionRE.FindStringSubmatch(out)
	if m == nil {
		c.Detail = "cannot read the version of " + p + ": " + firstLine(out)
		return c
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	ver := m[1] + "." + m[2]
	if m[3] != "" {
		ver += "." + m[3]
	}
	if major > 1 || (major == 1 && minor >= 43) {
		c.Status, c.Detail, c.Fix = OK, "e2fsprogs "+ver+" (mkfs.ext4 -d supported)", ""
		return c
	}
	c.Detail = "e2fsprogs " + ver + " is older than 1.43"
	return c
}

func spaceCheck(name, dir string) Check {
	p := dir
	for {
		if _, err := os.Stat(p); err == nil {
			break
		}
		parent := filepath.Dir(p)
		if parent == p {
			break
		}
		p = parent
	}
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return Check{Name: name, Status: Warn, Detail: fmt.Sprintf("statfs %s: %v", p, err)}
	}
	free := int64(st.Bavail) * st.Bsize
	c := Check{Name: name, Status: OK, Detail: fmt.Sprintf("%s free at %s", units.HumanBytes(free), dir)}
	switch {
	case free < 1<<30:
		c.Status, c.Required, c.Fix = Fail, true, "free space on the file system holding "+dir+": images need at least 1 GiB each"
	case free < 5<<30:
		c.Status, c.Fix = Warn, "less than 5 GiB free: pulling large images may fail"
	}
	return c
}

// Failed reports whether a required check failed.
func Failed(cs []Check) bool {
	for _, c := range cs {
		if c.Required && c.Status == Fail {
			return true
		}
	}
	return false
}
