// Package jailer is Firecracker's jailer as banger uses it: the jailer's
// command line (Invocation: built by Args, checked by Parse and Validate
// against the jailer's documented contract, docs/jailer.md upstream), the
// chroot banger prepares for it and removes after it (chroot.go), and the
// cgroups it leaves behind.
//
// The jailer (run as root) builds <chroot-base>/<exec-file-name>/<id>/root,
// copies Firecracker into it, moves itself into the cgroups
// <controller-root>/<parent-cgroup>/<id>, pivots into the chroot, makes
// /dev/kvm and /dev/net/tun there, and, with --new-pid-ns, clones a child
// into a new pid namespace whose host pid it writes to
// <chroot>/<exec-file-name>.pid; the child drops to --uid/--gid and execs
// `<exec-file-name> --id=<id> --start-time-us=N --start-time-cpu-us=N`
// followed by the arguments after "--". Every path Firecracker is given is
// then resolved inside the chroot.
package jailer

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// DefaultChrootBase is the jailer's default --chroot-base-dir.
const DefaultChrootBase = "/srv/jailer"

// ParentCgroup is the --parent-cgroup banger passes: every VM's cgroup is
// <controller-root>/banger/<id>, so banger removes only cgroups under a
// parent of its own.
const ParentCgroup = "banger"

// ErrContract marks a jailer command line the documented contract refuses.
var ErrContract = errors.New("jailer command line breaks the jailer's contract")

// Invocation is one jailer command line, flag by flag.
type Invocation struct {
	ID             string   // --id: 1-64 of [A-Za-z0-9-]
	ExecFile       string   // --exec-file: absolute; its file name contains "firecracker"
	UID, GID       uint32   // --uid, --gid
	ParentCgroup   string   // --parent-cgroup: a relative path; "" is the jailer's default (the exec file's name)
	CgroupVersion  int      // --cgroup-version: 1 or 2; 0 omits the flag (the jailer's default, 1)
	Cgroups        []string // --cgroup <controller>.<file>=<value>, repeated
	ChrootBase     string   // --chroot-base-dir: absolute; "" is DefaultChrootBase
	NetNS          string   // --netns: absolute path of a network namespace handle
	ResourceLimits []string // --resource-limit fsize=N | no-file=N, repeated
	Daemonize      bool     // --daemonize
	NewPIDNS       bool     // --new-pid-ns
	Extra          []string // after "--": Firecracker's own arguments
}

var (
	idRE     = regexp.MustCompile(`^[A-Za-z0-9-]{1,64}$`)
	cgFileRE = regexp.MustCompile(`^[a-z_]+(\.[a-z_0-9]+)+$`)
	cgPathRE = regexp.MustCompile(`^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$`)
)

// ValidID reports whether id is a jailer --id.
func ValidID(id string) bool { return idRE.MatchString(id) }

// ExecName is the exec file's last path component: the chroot's parent
// dir name, the name Firecracker has inside the chroot and the pid file's
// stem.
func (inv Invocation) ExecName() string { return filepath.Base(inv.ExecFile) }

// Base is the chroot base dir the jailer uses.
func (inv Invocation) Base() string {
	if inv.ChrootBase == "" {
		return DefaultChrootBase
	}
	return inv.ChrootBase
}

// JailDir is <chroot-base>/<exec-file-name>/<id>, the parent of the chroot.
func (inv Invocation) JailDir() string { return filepath.Join(inv.Base(), inv.ExecName(), inv.ID) }

// ChrootDir is <chroot-base>/<exec-file-name>/<id>/root.
func (inv Invocation) ChrootDir() string { return filepath.Join(inv.JailDir(), "root") }

// PIDFile is where the jailer writes the host pid of Firecracker under
// --new-pid-ns: <chroot>/<exec-file-name>.pid.
func (inv Invocation) PIDFile() string { return filepath.Join(inv.ChrootDir(), inv.ExecName()+".pid") }

// Parent is the parent cgroup the jailer uses.
func (inv Invocation) Parent() string {
	if inv.ParentCgroup == "" {
		return inv.ExecName()
	}
	return inv.ParentCgroup
}

// Args is the command line (without the program name).
func (inv Invocation) Args() []string {
	a := []string{"--id", inv.ID, "--exec-file", inv.ExecFile,
		"--uid", strconv.FormatUint(uint64(inv.UID), 10), "--gid", strconv.FormatUint(uint64(inv.GID), 10)}
	if inv.ParentCgroup != "" {
		a = append(a, "--parent-cgroup", inv.ParentCgroup)
	}
	if inv.CgroupVersion != 0 {
		a = append(a, "--cgroup-version", strconv.Itoa(inv.CgroupVersion))
	}
	for _, c := range inv.Cgroups {
		a = append(a, "--cgroup", c)
	}
	if inv.ChrootBase != "" {
		a = append(a, "--chroot-base-dir", inv.ChrootBase)
	}
	if inv.NetNS != "" {
		a = append(a, "--netns", inv.NetNS)
	}
	for _, r := range inv.ResourceLimits {
		a = append(a, "--resource-limit", r)
	}
	if inv.Daemonize {
		a = append(a, "--daemonize")
	}
	if inv.NewPIDNS {
		a = append(a, "--new-pid-ns")
	}
	if len(inv.Extra) > 0 {
		a = append(a, "--")
		a = append(a, inv.Extra...)
	}
	return a
}

// Validate checks inv against the jailer's documented contract.
func (inv Invocation) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%s: %w", fmt.Sprintf(format, a...), ErrContract)
	}
	if !ValidID(inv.ID) {
		return bad("--id %q: want 1 to 64 letters, digits and hyphens", inv.ID)
	}
	if err := absPath("--exec-file", inv.ExecFile); err != nil {
		return bad("%v", err)
	}
	if !strings.Contains(inv.ExecName(), "firecracker") {
		return bad("--exec-file %q: the file name must contain \"firecracker\"", inv.ExecFile)
	}
	if inv.ParentCgroup != "" && (!cgPathRE.MatchString(inv.ParentCgroup) || slices.Contains(strings.Split(inv.ParentCgroup, "/"), "..") || slices.Contains(strings.Split(inv.ParentCgroup, "/"), ".")) {
		return bad("--parent-cgroup %q: want a relative path inside the cgroup hierarchy", inv.ParentCgroup)
	}
	switch inv.CgroupVersion {
	case 0, 1, 2:
	default:
		return bad("--cgroup-version %d: want 1 or 2", inv.CgroupVersion)
	}
	for _, c := range inv.Cgroups {
		file, value, ok := strings.Cut(c, "=")
		if !ok || !cgFileRE.MatchString(file) || value == "" || strings.ContainsFunc(value, isControl) {
			return bad("--cgroup %q: want <controller>.<file>=<value>", c)
		}
	}
	if inv.ChrootBase != "" {
		if err := absPath("--chroot-base-dir", inv.ChrootBase); err != nil {
			return bad("%v", err)
		}
	}
	if inv.NetNS != "" {
		if err := absPath("--netns", inv.NetNS); err != nil {
			return bad("%v", err)
		}
	}
	for _, r := range inv.ResourceLimits {
		name, value, ok := strings.Cut(r, "=")
		if _, err := strconv.ParseUint(value, 10, 64); !ok || err != nil || (name != "fsize" && name != "no-file") {
			return bad("--resource-limit %q: want fsize=<bytes> or no-file=<count>", r)
		}
	}
	for _, e := range inv.Extra {
		if e == "--id" || strings.HasPrefix(e, "--id=") {
			return bad("Firecracker argument %q: the jailer passes --id itself", e)
		}
	}
	return nil
}

func absPath(flag, p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%s is required", flag)
	case !filepath.IsAbs(p):
		return fmt.Errorf("%s %q: want an absolute path", flag, p)
	case filepath.Clean(p) != p:
		return fmt.Errorf("%s %q: want a clean path (no \"..\", \".\" or doubled \"/\")", flag, p)
	case strings.ContainsFunc(p, isControl):
		return fmt.Errorf("%s %q: control characters", flag, p)
	}
	return nil
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }

// Parse reads a jailer command line (without the program name) as the
// jailer does: "--flag value" pairs, the two boolean flags, "--" and then
// Firecracker's arguments. Unknown flags, a flag given twice (but
// --cgroup and --resource-limit), a missing value or a missing required
// flag (--id, --exec-file, --uid, --gid) are refused, and the result is
// Validated.
func Parse(args []string) (Invocation, error) {
	var inv Invocation
	seen := map[string]bool{}
	bad := func(format string, a ...any) (Invocation, error) {
		return Invocation{}, fmt.Errorf("%s: %w", fmt.Sprintf(format, a...), ErrContract)
	}
	for i := 0; i < len(args); i++ {
		flag := args[i]
		if flag == "--" {
			inv.Extra = append([]string(nil), args[i+1:]...)
			break
		}
		switch flag {
		case "--daemonize", "--new-pid-ns":
			if seen[flag] {
				return bad("%s given twice", flag)
			}
			seen[flag] = true
			inv.Daemonize = inv.Daemonize || flag == "--daemonize"
			inv.NewPIDNS = inv.NewPIDNS || flag == "--new-pid-ns"
			continue
		case "--id", "--exec-file", "--uid", "--gid", "--parent-cgroup", "--cgroup-version",
			"--chroot-base-dir", "--netns", "--cgroup", "--resource-limit":
		default:
			return bad("unknown argument %q", flag)
		}
		if seen[flag] && flag != "--cgroup" && flag != "--resource-limit" {
			return bad("%s given twice", flag)
		}
		seen[flag] = true
		if i+1 >= len(args) || strings.HasPrefix(args[i+1], "--") {
			return bad("%s needs a value", flag)
		}
		i++
		v := args[i]
		var err error
		switch flag {
		case "--id":
			inv.ID = v
		case "--exec-file":
			inv.ExecFile = v
		case "--uid":
			inv.UID, err = parseID(v)
		case "--gid":
			inv.GID, err = parseID(v)
		case "--parent-cgroup":
			inv.ParentCgroup = v
		case "--cgroup-version":
			switch v {
			case "1", "2":
				inv.CgroupVersion = int(v[0] - '0')
			default:
				err = fmt.Errorf("want 1 or 2")
			}
		case "--chroot-base-dir":
			inv.ChrootBase = v
		case "--netns":
			inv.NetNS = v
		case "--cgroup":
			inv.Cgroups = append(inv.Cgroups, v)
		case "--resource-limit":
			inv.ResourceLimits = append(inv.ResourceLimits, v)
		}
		if err != nil {
			return bad("%s %q: %v", flag, v, err)
		}
	}
	for _, f := range []string{"--id", "--exec-file", "--uid", "--gid"} {
		if !seen[f] {
			return bad("%s is required", f)
		}
	}
	if err := inv.Validate(); err != nil {
		return Invocation{}, err
	}
	return inv, nil
}

func parseID(v string) (uint32, error) {
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("want a number")
	}
	return uint32(n), nil
}

// Config is how banger runs Firecracker under the jailer (the daemon's
// config "firecracker_jailer").
type Config struct {
	// Binary is the jailer executable (a path, or a name looked up in PATH).
	Binary string `json:"binary"`
	// UID and GID are what Firecracker runs as: not root.
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
	// ChrootBase is the jailer's --chroot-base-dir: absolute, on the file
	// system of banger's VM disks (they are hard-linked into the chroot).
	ChrootBase string `json:"chroot_base"`
	// CgroupVersion is 1 or 2 (0 means 2).
	CgroupVersion int `json:"cgroup_version,omitempty"`
	// Cgroups are extra --cgroup <controller>.<file>=<value> settings for
	// every VM, beside the memory limit banger sets from the VM's memory.
	Cgroups []string `json:"cgroups,omitempty"`
	// MemoryOverheadMiB is added to the guest's memory for the cgroup's
	// memory limit (the VMM's own use); 0 means 128. A negative value sets
	// no memory limit.
	MemoryOverheadMiB int `json:"memory_overhead_mib,omitempty"`
	// NetNS is an optional --netns (the VMs' taps must be inside it).
	NetNS string `json:"netns,omitempty"`
	// IDRange, when set, gives every VM its own uid and gid: UID+n and
	// GID+n, n the index of the VM's address in the subnet (below
	// IDRange), so that one compromised VMM cannot open another VM's tap.
	IDRange uint32 `json:"id_range,omitempty"`
}

// IDsFor is the uid and gid of the VM whose address has index n in the
// subnet: UID and GID, or with IDRange, UID+n and GID+n.
func (c Config) IDsFor(n uint32) (uid, gid uint32, err error) {
	if c.IDRange == 0 {
		return c.UID, c.GID, nil
	}
	if n >= c.IDRange {
		return 0, 0, fmt.Errorf("jailer id_range %d: the VM's address index %d is outside it (give id_range at least the subnet's size): %w", c.IDRange, n, ErrContract)
	}
	return c.UID + n, c.GID + n, nil
}

// CheckRange reports a uid or gid range that overflows.
func (c Config) CheckRange() error {
	if c.IDRange > 0 && (uint64(c.UID)+uint64(c.IDRange) > 1<<32-1 || uint64(c.GID)+uint64(c.IDRange) > 1<<32-1) {
		return fmt.Errorf("jailer uid %d / gid %d + id_range %d overflow 32 bits: %w", c.UID, c.GID, c.IDRange, ErrContract)
	}
	return nil
}

// Invocation is the jailer command line for VM id running execFile (an
// absolute path) with memoryMiB of guest memory and Firecracker's own
// arguments fcArgs. banger's choices on top of the contract: a new pid
// namespace always; never --daemonize (Firecracker's stdout is the
// console pipe); --parent-cgroup banger; an explicit cgroup version; a
// memory limit; never uid or gid 0.
func (c Config) Invocation(id, execFile string, memoryMiB int, fcArgs []string) (Invocation, error) {
	if c.UID == 0 || c.GID == 0 {
		return Invocation{}, fmt.Errorf("jailer uid %d, gid %d: Firecracker must not run as root or in group 0 under the jailer: %w", c.UID, c.GID, ErrContract)
	}
	if c.ChrootBase == "" {
		return Invocation{}, fmt.Errorf("jailer chroot base is not set: %w", ErrContract)
	}
	inv := Invocation{
		ID: id, ExecFile: execFile, UID: c.UID, GID: c.GID,
		ParentCgroup: ParentCgroup, CgroupVersion: c.CgroupVersion,
		ChrootBase: c.ChrootBase, NetNS: c.NetNS, NewPIDNS: true,
		Extra: append([]string(nil), fcArgs...),
	}
	if inv.CgroupVersion == 0 {
		inv.CgroupVersion = 2
	}
	if c.MemoryOverheadMiB >= 0 && memoryMiB > 0 {
		over := c.MemoryOverheadMiB
		if over == 0 {
			over = 128
		}
		limit := strconv.FormatInt(int64(memoryMiB+over)<<20, 10)
		if inv.CgroupVersion == 2 {
			inv.Cgroups = append(inv.Cgroups, "memory.max="+limit)
		} else {
			inv.Cgroups = append(inv.Cgroups, "memory.limit_in_bytes="+limit)
		}
	}
	inv.Cgroups = append(inv.Cgroups, c.Cgroups...)
	if err := inv.Validate(); err != nil {
		return Invocation{}, err
	}
	return inv, nil
}

// FromJailDir reads a recorded JailDir (<base>/<exec-file-name>/<id>) back
// into the Invocation fields Remove needs. It refuses a dir that is not
// directly under base.
func FromJailDir(base, dir string) (Invocation, error) {
	dir = filepath.Clean(dir)
	id, execDir := filepath.Base(dir), filepath.Dir(dir)
	if filepath.Dir(execDir) != filepath.Clean(base) || !ValidID(id) || !strings.Contains(filepath.Base(execDir), "firecracker") {
		return Invocation{}, fmt.Errorf("jail %s is not <%s>/<firecracker>/<id>: %w", dir, base, ErrNotBangers)
	}
	return Invocation{ID: id, ExecFile: "/" + filepath.Base(execDir), ChrootBase: filepath.Clean(base), ParentCgroup: ParentCgroup}, nil
}
