// Package config holds the daemon's settings: where it keeps state, cache
// and runtime files, where its socket is, and the host-resource defaults.
// Settings come from built-in defaults (which differ for root and for a
// normal user), then the config file, then command-line flags.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/quota"
	"github.com/bangerdev/banger/internal/units"
	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer"
)

// Config is the daemon's configuration. The JSON names are the config
// file's keys.
type Config struct {
	StateDir    string `json:"state_dir"`
	CacheDir    string `json:"cache_dir"`
	RuntimeDir  string `json:"runtime_dir"`
	Socket      string `json:"socket"`
	SocketGroup string `json:"socket_group"` // group given access to the socket when it exists

	Bridge     string   `json:"bridge"`
	Subnet     string   `json:"subnet"`
	DNS        []string `json:"dns,omitempty"`
	DiskDriver string   `json:"disk_driver"` // auto, dm-snapshot, reflink, copy
	VMM        string   `json:"vmm"`         // auto, firecracker, qemu

	FirecrackerBinary string `json:"firecracker_binary,omitempty"`
	// FirecrackerArgs are extra arguments given to the firecracker binary
	// before --api-sock (for Firecracker-compatible stand-ins in tests,
	// such as banger-fake-firecracker's --agent-root).
	FirecrackerArgs []string `json:"firecracker_args,omitempty"`
	QEMUBinary      string   `json:"qemu_binary,omitempty"`
	AgentBinary     string   `json:"agent_binary,omitempty"` // static banger-vsock-agent injected into images
	InitBinary      string   `json:"init_binary,omitempty"`  // static banger-init put into generated initramfs

	KernelCatalog string `json:"kernel_catalog,omitempty"` // URL of the kernel catalog index
	ImageCatalog  string `json:"image_catalog,omitempty"`  // URL of the image catalog index

	HealthyTimeout Duration `json:"healthy_timeout"` // how long a starting VM may take to answer the agent

	// ReadyCheck is what makes a starting VM "running": "ssh" (default:
	// the agent answers, first boot is done, the host key is known and
	// sshd accepts connections) or "agent" (the agent answers and first
	// boot is done; for images without sshd).
	ReadyCheck string `json:"ready_check,omitempty"`
	// FirecrackerWithoutKVM lets --vmm firecracker be chosen on a host
	// without hardware KVM, for Firecracker-compatible stand-ins (banger's
	// fake Firecracker in tests). Real Firecracker needs KVM.
	FirecrackerWithoutKVM bool `json:"firecracker_without_kvm,omitempty"`

	// VMMUser is the unprivileged user QEMU runs as (its group too); ""
	// runs QEMU as the daemon's own user. Root's default is "banger-vmm",
	// which `make install` creates (the daemon creates it when missing
	// and /etc is writable).
	VMMUser string `json:"vmm_user"`
	// ConsoleLogMax caps each VM's console log file ("4M"); the previous
	// part is kept in console.log.1, so a VM's console takes at most twice
	// this. Empty means 4 MiB.
	ConsoleLogMax string `json:"console_log_max,omitempty"`
	// Limits bound each VM's size and what one non-root user may hold.
	Limits Limits `json:"limits,omitzero"`
	// FirecrackerJailer, when set, starts Firecracker through its jailer:
	// {"binary": "/usr/bin/jailer", "uid": 900000, "gid": 900000,
	// "chroot_base": "/var/lib/banger/jail", "cgroup_version": 2,
	// "cgroups": ["cpu.max=..."]}. The chroot base defaults to
	// <state_dir>/jail (it must be on the VMs' file system: their disks are
	// hard-linked into the chroot). See docs/jailer.md.
	FirecrackerJailer *jailer.Config `json:"firecracker_jailer,omitempty"`
}

// Jailer is FirecrackerJailer with its defaults filled (a copy), or nil.
func (c Config) Jailer() *jailer.Config {
	if c.FirecrackerJailer == nil {
		return nil
	}
	j := *c.FirecrackerJailer
	j.Cgroups = append([]string(nil), j.Cgroups...)
	if j.ChrootBase == "" {
		j.ChrootBase = filepath.Join(c.StateDir, "jail")
	}
	if j.CgroupVersion == 0 {
		j.CgroupVersion = 2
	}
	return &j
}

// Limits are the "limits" section of the config file. Sizes are strings
// such as "16G"; 0 or "" means the default bound (per VM) or no limit (per
// user).
type Limits struct {
	VMCPUs   int    `json:"vm_cpus,omitempty"`   // vCPUs of one VM (default 64)
	VMMemory string `json:"vm_memory,omitempty"` // memory of one VM (default 256G)
	VMDisk   string `json:"vm_disk,omitempty"`   // disk of one VM (default 2T)
	VMs      int    `json:"vms,omitempty"`       // VMs per user
	CPUs     int    `json:"cpus,omitempty"`      // vCPUs per user, over all their VMs
	Memory   string `json:"memory,omitempty"`    // memory per user
	Disk     string `json:"disk,omitempty"`      // disk per user
}

// Quota returns the limits in bytes, for internal/quota.
func (c Config) Quota() (quota.Limits, error) {
	l := quota.Limits{VMCPUs: c.Limits.VMCPUs, VMs: c.Limits.VMs, CPUs: c.Limits.CPUs}
	for _, f := range []struct {
		key string
		v   string
		dst *int64
	}{
		{"vm_memory", c.Limits.VMMemory, &l.VMMemory}, {"vm_disk", c.Limits.VMDisk, &l.VMDisk},
		{"memory", c.Limits.Memory, &l.Memory}, {"disk", c.Limits.Disk, &l.Disk},
	} {
		n, err := units.ParseSize(f.v)
		if err != nil {
			return l, fmt.Errorf("config limits.%s: %w", f.key, err)
		}
		*f.dst = n
	}
	if l.VMCPUs < 0 || l.VMs < 0 || l.CPUs < 0 {
		return l, errors.New("config limits: counts must not be negative")
	}
	return l, nil
}

// ConsoleLogBytes is ConsoleLogMax in bytes (0 for the default).
func (c Config) ConsoleLogBytes() (int64, error) {
	n, err := units.ParseSize(c.ConsoleLogMax)
	if err != nil {
		return 0, fmt.Errorf("config console_log_max: %w", err)
	}
	if n != 0 && n < 4096 {
		return 0, fmt.Errorf("config console_log_max %q: use at least 4K", c.ConsoleLogMax)
	}
	return n, nil
}

// Duration is a time.Duration written as a Go duration string ("90s").
type Duration time.Duration

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"90s\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// Defaults returns the built-in configuration for a process with the given
// euid. Root uses the system paths; a normal user uses XDG paths under home.
func Defaults(euid int, home, xdgRuntime string) Config {
	c := Config{
		SocketGroup:    "banger",
		Bridge:         "banger0",
		Subnet:         "172.30.0.0/24",
		DiskDriver:     "auto",
		VMM:            "auto",
		HealthyTimeout: Duration(5 * time.Minute),
	}
	if euid == 0 {
		c.VMMUser = "banger-vmm"
		c.StateDir = "/var/lib/banger"
		c.CacheDir = "/var/cache/banger"
		c.RuntimeDir = "/run/banger"
	} else {
		c.StateDir = filepath.Join(home, ".local", "state", "banger")
		c.CacheDir = filepath.Join(home, ".cache", "banger")
		if xdgRuntime == "" {
			xdgRuntime = filepath.Join(os.TempDir(), fmt.Sprintf("banger-%d", euid))
		}
		c.RuntimeDir = filepath.Join(xdgRuntime, "banger")
	}
	c.Socket = filepath.Join(c.RuntimeDir, "banger.sock")
	return c
}

// ForCurrentProcess returns Defaults for this process.
func ForCurrentProcess() Config {
	home, _ := os.UserHomeDir()
	return Defaults(os.Geteuid(), home, os.Getenv("XDG_RUNTIME_DIR"))
}

// DefaultFile is where the config file is looked for when --config is not
// given: /etc/banger/config.json for root, ~/.config/banger/config.json
// otherwise.
func DefaultFile(euid int, home string) string {
	if euid == 0 {
		return "/etc/banger/config.json"
	}
	return filepath.Join(home, ".config", "banger", "config.json")
}

// Load overlays the config file at path onto c. A missing file is not an
// error unless required is true. Unknown keys are an error, so that a typo
// does not silently fall back to a default.
func Load(c *Config, path string, required bool) error {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) && !required {
			return nil
		}
		return fmt.Errorf("read config %s: %w", path, err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	socketSet := false
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(b, &probe); err == nil {
		_, socketSet = probe["socket"]
	}
	runtimeBefore := c.RuntimeDir
	if err := dec.Decode(c); err != nil {
		return fmt.Errorf("parse config %s: %w", path, err)
	}
	if !socketSet && c.RuntimeDir != runtimeBefore {
		c.Socket = filepath.Join(c.RuntimeDir, "banger.sock")
	}
	return nil
}

// Validate checks that the paths are absolute and the enums known.
func (c Config) Validate() error {
	for _, p := range []struct{ name, v string }{
		{"state_dir", c.StateDir}, {"cache_dir", c.CacheDir}, {"runtime_dir", c.RuntimeDir}, {"socket", c.Socket},
	} {
		if !filepath.IsAbs(p.v) {
			return fmt.Errorf("config %s must be an absolute path, got %q", p.name, p.v)
		}
	}
	switch c.DiskDriver {
	case "auto", "dm-snapshot", "reflink", "copy":
	default:
		return fmt.Errorf("config disk_driver %q is not one of auto, dm-snapshot, reflink, copy", c.DiskDriver)
	}
	switch c.VMM {
	case "auto", "firecracker", "qemu":
	default:
		return fmt.Errorf("config vmm %q is not one of auto, firecracker, qemu", c.VMM)
	}
	switch c.ReadyCheck {
	case "", "ssh", "agent":
	default:
		return fmt.Errorf("config ready_check %q is not one of ssh, agent", c.ReadyCheck)
	}
	if _, err := c.Quota(); err != nil {
		return err
	}
	if _, err := c.ConsoleLogBytes(); err != nil {
		return err
	}
	if j := c.Jailer(); j != nil {
		if j.Binary == "" {
			return fmt.Errorf("config firecracker_jailer.binary is empty: name the jailer executable")
		}
		// The per-VM command line is checked again at each start; this
		// catches the settings every VM shares.
		if _, err := j.Invocation("config-check", "/firecracker", 128, nil); err != nil {
			return fmt.Errorf("config firecracker_jailer: %w", err)
		}
		if err := j.CheckRange(); err != nil {
			return fmt.Errorf("config firecracker_jailer: %w", err)
		}
	}
	return nil
}

// ImagesDir is where published images live.
func (c Config) ImagesDir() string { return filepath.Join(c.StateDir, "images") }

// KernelsDir is where kernels live.
func (c Config) KernelsDir() string { return filepath.Join(c.StateDir, "kernels") }

// VMsDir is where per-VM disks live.
func (c Config) VMsDir() string { return filepath.Join(c.StateDir, "vms") }

// ScratchDir is the daemon's private scratch dir (pull extraction trees):
// root-owned, mode 0700, emptied at start-up. Not $TMPDIR, where any user
// could plant what start-up recovery would then read.
func (c Config) ScratchDir() string { return filepath.Join(c.StateDir, "tmp") }

// DBPath is the state store.
func (c Config) DBPath() string { return filepath.Join(c.StateDir, "banger.db") }

// LockPath is the single-daemon lock.
func (c Config) LockPath() string { return filepath.Join(c.StateDir, "daemon.lock") }
