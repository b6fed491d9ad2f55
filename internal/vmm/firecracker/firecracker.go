// Package firecracker is banger's Firecracker backend: a small client for
// Firecracker's REST API (the Go SDK is not used) and a vmm.Monitor that
// starts `firecracker --api-sock <runtime>/fc.sock` detached, configures the
// VM through the API and sends InstanceStart.
//
// Sub-packages: apispec holds the API description every request is checked
// against, and fake is a Firecracker stand-in for hosts without KVM.
package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/consolelog"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer"
)

// Name is the backend's registry name.
const Name = "firecracker"

// APISocketName is the API socket's file name inside Spec.RuntimeDir.
const APISocketName = "fc.sock"

// ConsoleFIFOName is the console pipe's file name inside Spec.RuntimeDir:
// Firecracker's stdout and stderr, followed by the daemon into the capped
// console log.
const ConsoleFIFOName = "console.fifo"

func init() {
	vmm.Register(Name, func() vmm.Monitor { return New() })
}

// Monitor runs VMs with Firecracker. The zero value is not usable; use New.
type Monitor struct {
	// Binary is the firecracker executable (a name looked up in PATH, or a path).
	Binary string
	// Args are extra arguments placed before --api-sock (used by tests to
	// run the fake through a wrapper).
	Args []string
	// StartTimeout bounds the wait for the API socket and the configuration.
	StartTimeout time.Duration
	// TermWait is how long SIGTERM gets before SIGKILL.
	TermWait time.Duration
	// Jailer, when set, starts Firecracker through its jailer (see
	// jail.go): unprivileged, chrooted, in its own cgroups and pid
	// namespace.
	Jailer *jailer.Config
}

// New returns a Monitor with the defaults: "firecracker" from PATH, 10 s to
// come up, 3 s between SIGTERM and SIGKILL.
func New() *Monitor {
	return &Monitor{Binary: "firecracker", StartTimeout: 10 * time.Second, TermWait: 3 * time.Second}
}

// Name implements vmm.Monitor.
func (m *Monitor) Name() string { return Name }

// DiskLinkName is the root drive's name inside Spec.RuntimeDir: a symlink
// to Spec.Disk. Firecracker runs in the runtime dir and is given this
// relative path, which is what its snapshots record, so a snapshot
// restores in another runtime dir onto another disk (as under the jailer).
const DiskLinkName = "rootfs.disk"

// Start implements vmm.Monitor.
func (m *Monitor) Start(ctx context.Context, spec vmm.Spec) (vmm.Handle, error) {
	return m.launch(ctx, spec, "start", configure)
}

// launch starts the firecracker process for spec in its runtime dir and
// calls setup with a client for its API and the validated spec once the
// socket answers.
func (m *Monitor) launch(ctx context.Context, spec vmm.Spec, verb string, setup func(ctx context.Context, c *Client, spec vmm.Spec) error) (h vmm.Handle, err error) {
	if err := spec.Validate(); err != nil {
		return vmm.Handle{}, err
	}
	if m.Jailer != nil {
		return m.launchJailed(ctx, spec, verb, setup)
	}
	fail := func(format string, a ...any) error {
		return fmt.Errorf("%s firecracker for VM %q: %w", verb, spec.Name, fmt.Errorf(format, a...))
	}
	bin, err := exec.LookPath(m.Binary)
	if err != nil {
		return vmm.Handle{}, fail("%w (is firecracker installed?)", err)
	}
	if err := os.MkdirAll(spec.RuntimeDir, 0o700); err != nil {
		return vmm.Handle{}, fail("create runtime dir: %w", err)
	}
	apiSock := filepath.Join(spec.RuntimeDir, APISocketName)
	// Stale sockets from a crashed run make Firecracker fail with "address
	// in use"; they are ours (inside this VM's runtime dir), so remove them.
	for _, s := range []string{apiSock, spec.AgentSocket} {
		if err := vmm.RemoveSocket(s); err != nil {
			return vmm.Handle{}, fail("%w", err)
		}
	}
	link := filepath.Join(spec.RuntimeDir, DiskLinkName)
	if spec.Disk != "" {
		if err := os.Remove(link); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return vmm.Handle{}, fail("replace disk link: %w", err)
		}
		if err := os.Symlink(spec.Disk, link); err != nil {
			return vmm.Handle{}, fail("disk link: %w", err)
		}
	}

	// The serial console is Firecracker's stdout: a named pipe the daemon
	// follows into the capped log (consolelog), never a file the guest
	// can grow without bound.
	fifo := filepath.Join(spec.RuntimeDir, ConsoleFIFOName)
	if err := consolelog.MakeFIFO(fifo); err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	out, err := consolelog.OpenFIFO(fifo, spec.ConsoleLog, spec.ConsoleLogMax)
	if err != nil {
		_ = consolelog.RemoveFIFO(fifo)
		return vmm.Handle{}, fail("%w", err)
	}

	args := append(append([]string{}, m.Args...), "--api-sock", apiSock)
	cmd := exec.Command(bin, args...) //nolint:gosec // binary is configuration, args are validated paths
	cmd.Dir = spec.RuntimeDir
	proc, err := vmm.StartDetachedOutput(cmd, out)
	_ = out.Close() // Firecracker has its own copy; the follower ends when it exits
	if err != nil {
		_ = consolelog.RemoveFIFO(fifo)
		return vmm.Handle{}, fail("%w", err)
	}
	h = proc.Handle
	h.APISocket = apiSock
	h.AgentSocket = spec.AgentSocket
	h.AgentTransport = vmm.TransportVsockUDS
	h.AgentCID = spec.VsockCID
	h.ConsoleFIFO, h.ConsoleLog, h.ConsoleLogMax = fifo, spec.ConsoleLog, spec.ConsoleLogMax
	defer func() {
		if err != nil {
			// Release what was made: the process, its sockets, the link.
			proc.Kill()
			_ = vmm.RemoveSocket(apiSock)
			_ = vmm.RemoveSocket(spec.AgentSocket)
			_ = consolelog.RemoveFIFO(fifo)
			consolelog.Drain(fifo, 2*time.Second)
			if spec.Disk != "" {
				_ = os.Remove(link)
			}
		}
	}()

	sctx, cancel := context.WithTimeout(ctx, m.StartTimeout)
	defer cancel()
	if err := vmm.WaitForSocket(sctx, apiSock, proc.Exited); err != nil {
		return h, fail("API socket: %w", err)
	}
	if err := proc.Reidentify(); err != nil {
		return h, fail("%w", err)
	}
	h.Cmdline = proc.Handle.Cmdline
	if err := setup(sctx, NewClient(apiSock), spec); err != nil {
		return h, fail("%w", err)
	}
	return h, nil
}

// configure sends the pre-boot configuration and InstanceStart.
func configure(ctx context.Context, c *Client, spec vmm.Spec) error {
	if err := c.PutMachineConfig(ctx, MachineConfig{VCPUCount: spec.CPUs, MemSizeMiB: spec.MemoryMiB}); err != nil {
		return err
	}
	if err := c.PutBootSource(ctx, BootSource{KernelImagePath: spec.Kernel, InitrdPath: spec.Initrd, BootArgs: spec.Cmdline}); err != nil {
		return err
	}
	if spec.Disk != "" {
		if err := c.PutDrive(ctx, Drive{DriveID: "rootfs", PathOnHost: DiskLinkName, IsRootDevice: true}); err != nil {
			return err
		}
	}
	if spec.Tap != "" {
		if err := c.PutNetworkInterface(ctx, NetworkInterface{IfaceID: ifaceID, HostDevName: spec.Tap, GuestMAC: spec.MAC}); err != nil {
			return err
		}
	}
	if err := c.PutVsock(ctx, Vsock{GuestCID: spec.VsockCID, UDSPath: spec.AgentSocket}); err != nil {
		return err
	}
	return c.Action(ctx, ActionInstanceStart)
}

// ifaceID is the guest network interface's id in the API.
const ifaceID = "eth0"

// Stop implements vmm.Monitor: SendCtrlAltDel (the guest reboots, and
// Firecracker exits on the CPU reset), then SIGTERM, then SIGKILL.
func (m *Monitor) Stop(ctx context.Context, h vmm.Handle, graceful time.Duration) (vmm.StopMethod, error) {
	how, err := vmm.StopVerified(h, "firecracker", func() (vmm.StopMethod, error) { return m.stop(ctx, h, graceful) })
	if err == nil && how != vmm.StoppedAlready && h.ConsoleFIFO != "" {
		// The monitor is gone: its last console output is in the log once
		// the follower has read the pipe to its end.
		consolelog.Drain(h.ConsoleFIFO, 2*time.Second)
	}
	if err == nil && h.Jail != "" {
		if jerr := m.removeJail(h); jerr != nil {
			return how, fmt.Errorf("stop firecracker pid %d: %w", h.PID, jerr)
		}
	}
	return how, err
}

func (m *Monitor) stop(ctx context.Context, h vmm.Handle, graceful time.Duration) (vmm.StopMethod, error) {
	if graceful > 0 && h.APISocket != "" {
		actx, cancel := context.WithTimeout(ctx, min(graceful, 2*time.Second))
		err := NewClient(h.APISocket).Action(actx, ActionSendCtrlAltDel)
		cancel()
		if err == nil && vmm.WaitGone(ctx, h, graceful) {
			return vmm.StoppedGraceful, nil
		}
	}
	return vmm.Terminate(ctx, h, m.TermWait)
}

// Alive implements vmm.Monitor.
func (m *Monitor) Alive(h vmm.Handle) (bool, error) { return vmm.Alive(h) }

// Reattach implements vmm.Monitor: the process must be the recorded one and
// its API must report a running instance.
func (m *Monitor) Reattach(ctx context.Context, h vmm.Handle) error {
	alive, err := vmm.Alive(h)
	if err != nil {
		return fmt.Errorf("reattach firecracker pid %d: %w", h.PID, err)
	}
	if !alive {
		return fmt.Errorf("reattach firecracker pid %d: %w", h.PID, vmm.ErrNotRunning)
	}
	info, err := NewClient(h.APISocket).DescribeInstance(ctx)
	if err != nil {
		return fmt.Errorf("reattach firecracker pid %d: %w", h.PID, err)
	}
	if info.State != "Running" && info.State != "Paused" {
		return fmt.Errorf("reattach firecracker pid %d: instance state is %q: %w", h.PID, info.State, errNotBooted)
	}
	if h.ConsoleFIFO != "" {
		// The console went unread while no daemon ran; follow it again.
		if err := consolelog.FollowFIFO(h.ConsoleFIFO, h.ConsoleLog, h.ConsoleLogMax); err != nil {
			return fmt.Errorf("reattach firecracker pid %d: %w", h.PID, err)
		}
	}
	return nil
}

var errNotBooted = errors.New("the guest was never started")
