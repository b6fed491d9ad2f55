// Package vmm is the contract between banger's daemon and the programs that
// run its virtual machines (VM monitors): Firecracker and QEMU.
//
// A backend implements Monitor and registers itself with Register from an
// init function; the daemon picks one with Select and Get. A started VM is
// described by a Handle, which the daemon persists: after a daemon restart
// the Handle alone is enough to check (Alive), reconnect to (Reattach) and
// stop (Stop) the VM, because monitors run detached in their own session.
//
// Handles are checked, never trusted: a pid is only treated as the VM's
// process when its start time, the host's boot id and its command line all
// match what was recorded at Start, so a reused pid is never signalled.
package vmm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/guestabi"
)

// Sentinel errors. Test with errors.Is.
var (
	// ErrNotSupported marks an optional capability a backend lacks.
	ErrNotSupported = errors.New("not supported by this VM monitor")
	// ErrNotRunning means the handle's process is gone (or the pid now
	// belongs to another process).
	ErrNotRunning = errors.New("VM monitor process is not running")
	// ErrUnknownMonitor means no backend is registered under the name.
	ErrUnknownMonitor = errors.New("unknown VM monitor")
	// ErrInvalidSpec means a Spec field is missing or malformed.
	ErrInvalidSpec = errors.New("invalid VM spec")
)

// Agent transports, the values of Handle.AgentTransport (the agent
// package names them; AgentConn dials them).
const (
	// TransportVsockUDS is Firecracker's hybrid vsock: connect to the Unix
	// socket Handle.AgentSocket, send "CONNECT <port>\n", read "OK <n>\n".
	TransportVsockUDS = string(agent.TransportVsockUDS)
	// TransportVsock is a vhost-vsock device: dial AF_VSOCK at the guest CID.
	TransportVsock = string(agent.TransportVsock)
	// TransportVirtioSerial is a virtio-serial port
	// (guestabi.AgentSerialPort) whose host end is the Unix socket
	// Handle.AgentSocket.
	TransportVirtioSerial = string(agent.TransportVirtioSerial)
)

// AgentConn connects to the guest agent of the VM that h describes, over the
// channel its monitor gave the guest, as lima's drivers hand their host
// agent a GuestAgentConn: nothing above this package formats or parses an
// agent address. serial reports a virtio-serial stream, on which the agent
// client must resynchronize (agent.ClientOptions.Resync).
func AgentConn(ctx context.Context, h Handle) (conn net.Conn, serial bool, err error) {
	switch h.AgentTransport {
	case TransportVsockUDS:
		conn, err = agent.ConnectVsockUDS(ctx, h.AgentSocket, guestabi.AgentVsockPort)
	case TransportVsock:
		conn, err = agent.DialVsock(ctx, h.AgentCID, guestabi.AgentVsockPort)
	case TransportVirtioSerial:
		var d net.Dialer
		conn, err = d.DialContext(ctx, "unix", h.AgentSocket)
		serial = true
	default:
		return nil, false, fmt.Errorf("agent channel %q of pid %d: %w", h.AgentTransport, h.PID, ErrNotSupported)
	}
	if err != nil {
		return nil, false, fmt.Errorf("connect to the guest agent (%s): %w", h.AgentTransport, err)
	}
	return conn, serial, nil
}

// Spec is what a VM monitor needs to start one VM. Paths are host paths the
// daemon has already prepared and validated; the monitor creates only the
// sockets it is told about (inside RuntimeDir) and appends to ConsoleLog.
type Spec struct {
	VMID      string // stable id, used in process names
	Name      string // human name, informational
	CPUs      int
	MemoryMiB int
	Kernel    string // kernel image
	Initrd    string // optional initramfs
	Cmdline   string // kernel command line
	Disk      string // root disk: block device or image file; optional
	Tap       string // tap device name; empty means no network device
	MAC       string // guest MAC for the tap, aa:bb:cc:dd:ee:ff
	// RuntimeDir is the per-VM directory that holds the monitor's sockets.
	RuntimeDir string
	// ConsoleLog receives the serial console (and the monitor's own output).
	ConsoleLog string
	// AgentSocket is the host-side Unix socket of the agent channel. Empty
	// means <RuntimeDir>/agent.sock.
	AgentSocket string
	// VsockCID is the guest's vsock context id (>= 3); 0 means 3.
	VsockCID uint32
	// Accel selects QEMU's accelerator: "kvm", "tcg" or "" for automatic.
	// Firecracker ignores it (it always needs KVM).
	Accel string
	// RunAs, when set, is the unprivileged user QEMU runs as (no
	// supplementary groups); QEMU opens no path of the daemon's itself but
	// gets descriptors, so it needs no access to banger's dirs. Firecracker
	// under its jailer runs as it instead of the jailer's configured uid
	// and gid (a uid per VM); without a jailer Firecracker ignores it.
	RunAs *Credential
	// ConsoleLogMax caps each console log file, in bytes (see consolelog);
	// 0 means consolelog.DefaultMax.
	ConsoleLogMax int64
}

// Credential is a user and group a monitor runs as.
type Credential struct {
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
}

// Handle identifies a running VM monitor process. It is plain data: persist
// it, and hand it back to any Monitor of the same backend.
type Handle struct {
	PID      int      `json:"pid"`
	PIDStart uint64   `json:"pid_start"` // field 22 of /proc/<pid>/stat
	BootID   string   `json:"boot_id"`   // /proc/sys/kernel/random/boot_id at start
	Cmdline  []string `json:"cmdline"`   // argv, as /proc/<pid>/cmdline shows it
	// APISocket is the monitor's control socket (Firecracker API or QMP).
	APISocket string `json:"api_socket"`
	// AgentSocket is the host end of the agent channel (empty for vsock).
	AgentSocket string `json:"agent_socket,omitempty"`
	// AgentTransport is one of the Transport* constants.
	AgentTransport string `json:"agent_transport"`
	// AgentCID is the guest CID when AgentTransport is TransportVsock.
	AgentCID uint32 `json:"agent_cid,omitempty"`
	// ConsoleSocket is the serial console's socket, which the daemon
	// follows into ConsoleLog (capped at ConsoleLogMax per file); empty
	// when the monitor writes the log itself.
	ConsoleSocket string `json:"console_socket,omitempty"`
	// ConsoleFIFO is the named pipe whose write end is the monitor's
	// stdout and stderr (Firecracker's serial console), which the daemon
	// follows into ConsoleLog (capped at ConsoleLogMax per file).
	ConsoleFIFO   string `json:"console_fifo,omitempty"`
	ConsoleLog    string `json:"console_log,omitempty"`
	ConsoleLogMax int64  `json:"console_log_max,omitempty"`
	// Jail is the jail dir of a monitor started through Firecracker's
	// jailer (<chroot-base>/<exec-file-name>/<id>), removed once the
	// monitor is gone; its sockets are inside it.
	Jail string `json:"jail,omitempty"`
}

// StopMethod says how Stop ended a VM.
type StopMethod string

// The ways a VM can end, from the gentlest.
const (
	StoppedAlready  StopMethod = "already-stopped" // nothing to do
	StoppedGraceful StopMethod = "graceful"        // the guest shut down on request
	StoppedQuit     StopMethod = "quit"            // the monitor quit on request (QEMU)
	StoppedTerm     StopMethod = "sigterm"
	StoppedKill     StopMethod = "sigkill"
)

// Lifecycle starts and stops VMs.
type Lifecycle interface {
	// Start launches the monitor detached (its own session, so a daemon
	// restart does not take it down), attaches every device and boots the
	// guest. It returns once the guest has been told to run. On error
	// nothing it started is left running.
	Start(ctx context.Context, spec Spec) (Handle, error)
	// Stop asks the guest to shut down and waits up to graceful, then asks
	// the monitor to quit, then sends SIGTERM and finally SIGKILL. A VM that
	// is already gone is a success (StoppedAlready). A handle whose pid now
	// belongs to another process is never signalled.
	Stop(ctx context.Context, h Handle, graceful time.Duration) (StopMethod, error)
}

// Prober checks a VM from its persisted handle.
type Prober interface {
	// Alive reports whether h's process is still running and is the same
	// process Start launched (start time, boot id and command line match).
	Alive(h Handle) (bool, error)
	// Reattach checks that the monitor answers on its control socket, for
	// use after a daemon restart. It returns an error wrapping ErrNotRunning
	// when the process is gone.
	Reattach(ctx context.Context, h Handle) error
}

// Monitor is a VM monitor backend.
type Monitor interface {
	// Name is the backend's registry name ("firecracker", "qemu").
	Name() string
	Lifecycle
	Prober
}

// Factory builds a Monitor with default settings.
type Factory func() Monitor

var (
	regMu    sync.RWMutex
	registry = map[string]Factory{}
)

// Register makes a backend available under name. It panics on a duplicate
// name, which is a programming error.
func Register(name string, f Factory) {
	regMu.Lock()
	defer regMu.Unlock()
	if _, dup := registry[name]; dup {
		panic("vmm: backend registered twice: " + name)
	}
	registry[name] = f
}

// Get returns a new Monitor of the named backend.
func Get(name string) (Monitor, error) {
	regMu.RLock()
	f, ok := registry[name]
	regMu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("VM monitor %q (known: %s): %w", name, strings.Join(Names(), ", "), ErrUnknownMonitor)
	}
	return f(), nil
}

// Names lists the registered backends, sorted.
func Names() []string {
	regMu.RLock()
	defer regMu.RUnlock()
	names := make([]string, 0, len(registry))
	for n := range registry {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Select resolves a user's preference ("auto", "firecracker", "qemu", or ""
// for auto) to a backend name and the reason for the choice, which the
// daemon records on the VM and shows.
//
// "auto" picks Firecracker when its binary is installed and hardware KVM is
// usable (see kvm.Hardware), else QEMU.
func Select(pref string) (name, reason string, err error) {
	return selectWith(pref, HostCaps())
}

func selectWith(pref string, caps Caps) (string, string, error) {
	switch pref {
	case "", "auto":
	case "firecracker":
		if caps.FirecrackerPath == "" {
			return "", "", fmt.Errorf("select VM monitor %q: the firecracker binary is not installed: %w", pref, ErrNotSupported)
		}
		if !caps.KVM {
			return "", "", fmt.Errorf("select VM monitor %q: %s (Firecracker needs hardware KVM; use --vmm qemu): %w", pref, caps.KVMReason, ErrNotSupported)
		}
		return pref, "requested", nil
	case "qemu":
		if caps.QEMUPath == "" {
			return "", "", fmt.Errorf("select VM monitor %q: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86): %w", pref, ErrNotSupported)
		}
		return pref, "requested", nil
	default:
		return "", "", fmt.Errorf("select VM monitor %q (want auto, firecracker or qemu): %w", pref, ErrUnknownMonitor)
	}
	switch {
	case caps.FirecrackerPath != "" && caps.KVM:
		return "firecracker", "auto: firecracker installed and hardware KVM usable", nil
	case caps.QEMUPath == "":
		why := "firecracker is not installed"
		if caps.FirecrackerPath != "" {
			why = caps.KVMReason
		}
		return "", "", fmt.Errorf("select VM monitor: %s, and qemu-system-x86_64 is not installed: %w", why, ErrNotSupported)
	case caps.FirecrackerPath == "":
		return "qemu", "auto: firecracker is not installed", nil
	default:
		return "qemu", "auto: no hardware KVM (" + caps.KVMReason + ")", nil
	}
}

var (
	macRE = regexp.MustCompile(`^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$`)
	// Interface names: at most 15 bytes, no '/', ':', ',' or whitespace.
	ifnameRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)
)

// Validate checks the fields every backend needs and fills defaults
// (AgentSocket, VsockCID). It returns an error wrapping ErrInvalidSpec.
func (s *Spec) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("VM %q: %s: %w", s.Name, fmt.Sprintf(format, a...), ErrInvalidSpec)
	}
	if s.CPUs < 1 {
		return bad("cpus %d: must be at least 1", s.CPUs)
	}
	if s.MemoryMiB < 16 {
		return bad("memory %d MiB: must be at least 16 MiB", s.MemoryMiB)
	}
	for _, p := range []struct{ what, path string }{
		{"kernel", s.Kernel}, {"runtime dir", s.RuntimeDir}, {"console log", s.ConsoleLog},
	} {
		if p.path == "" {
			return bad("%s path is empty", p.what)
		}
	}
	for _, p := range []struct{ what, path string }{
		{"kernel", s.Kernel}, {"initrd", s.Initrd}, {"disk", s.Disk},
		{"runtime dir", s.RuntimeDir}, {"console log", s.ConsoleLog}, {"agent socket", s.AgentSocket},
	} {
		if p.path == "" {
			continue
		}
		if !filepath.IsAbs(p.path) {
			return bad("%s path %q is not absolute", p.what, p.path)
		}
		if strings.ContainsFunc(p.path, isControl) {
			return bad("%s path %q contains control characters", p.what, p.path)
		}
	}
	if strings.ContainsFunc(s.Cmdline, isControl) {
		return bad("kernel command line contains control characters")
	}
	if s.Tap != "" && (!ifnameRE.MatchString(s.Tap) || s.Tap == "." || s.Tap == "..") {
		return bad("tap name %q is not a valid interface name", s.Tap)
	}
	if s.MAC != "" && !macRE.MatchString(s.MAC) {
		return bad("MAC %q is not of the form aa:bb:cc:dd:ee:ff", s.MAC)
	}
	if s.AgentSocket == "" {
		s.AgentSocket = filepath.Join(s.RuntimeDir, "agent.sock")
	}
	if s.VsockCID == 0 {
		s.VsockCID = 3
	}
	if s.VsockCID < 3 {
		return bad("vsock CID %d: must be at least 3", s.VsockCID)
	}
	// sun_path holds 108 bytes including the terminating NUL.
	if len(s.AgentSocket) > 107 {
		return bad("agent socket path %q is longer than a Unix socket allows", s.AgentSocket)
	}
	switch s.Accel {
	case "", "kvm", "tcg":
	default:
		return bad("accelerator %q: want kvm, tcg or empty", s.Accel)
	}
	return nil
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }

// WaitForSocket polls until a Unix socket at path accepts a connection, the
// check function reports an error (e.g. the process exited), or ctx ends.
func WaitForSocket(ctx context.Context, path string, check func() error) error {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return c.Close()
		}
		if check != nil {
			if cerr := check(); cerr != nil {
				return cerr
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for socket %s: %w (last error: %w)", path, ctx.Err(), err)
		case <-tick.C:
		}
	}
}
