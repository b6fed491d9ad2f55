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
