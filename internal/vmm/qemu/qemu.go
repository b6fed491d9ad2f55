// Package qemu is banger's QEMU backend (qemu-system-x86_64), the one that
// boots guests on hosts without hardware KVM.
//
// Machine: with hardware KVM, q35 with -accel kvm; otherwise pc with TCG and
// virtio-pci devices (microvm under TCG can hang at TSC calibration, see
// shared/MACHINE.md). Devices: a virtio-blk-pci disk (-blockdev, so a path
// is never parsed as a protocol), virtio-net-pci on the tap, and the agent
// channel: vhost-vsock-pci when /dev/vhost-vsock exists, else a
// virtio-serial port named org.banger.agent on a Unix-socket chardev.
//
// The serial console goes to the console log (appended), as do QEMU's own
// messages. -no-reboot makes a guest reboot end the VM, as it does under
// Firecracker: the daemon, not the guest, decides about restarts, and the
// VM shows as stopped. Control is QMP on <runtime>/qmp.sock.
//
// QEMU is started directly, detached with setsid, and not with -daemonize:
// the daemon then knows the pid at once (no pid file to race with or to
// trust) and reaps the child itself while it lives.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
)

// Name is the backend's registry name.
const Name = "qemu"

// QMPSocketName is the QMP socket's file name inside Spec.RuntimeDir.
const QMPSocketName = "qmp.sock"

func init() {
	vmm.Register(Name, func() vmm.Monitor { return New() })
}

// Monitor runs VMs with QEMU. Use New for the defaults.
type Monitor struct {
	// Binary is the QEMU executable (name in PATH, or path).
	Binary string
	// StartTimeout bounds the wait for QMP to answer after launch.
	StartTimeout time.Duration
	// QuitWait is how long QMP quit gets before SIGTERM.
	QuitWait time.Duration
	// TermWait is how long SIGTERM gets before SIGKILL.
	TermWait time.Duration
	// caps overrides host probing in tests.
	caps *vmm.Caps
}

// New returns a Monitor with the defaults.
func New() *Monitor {
	return &Monitor{Binary: "qemu-system-x86_64", StartTimeout: 15 * time.Second, QuitWait: 3 * time.Second, TermWait: 3 * time.Second}
}

// Name implements vmm.Monitor.
func (m *Monitor) Name() string { return Name }

func (m *Monitor) hostCaps() vmm.Caps {
	if m.caps != nil {
		return *m.caps
	}
	return vmm.HostCaps()
}

// Start implements vmm.Monitor.
func (m *Monitor) Start(ctx context.Context, spec vmm.Spec) (vmm.Handle, error) {
	return m.launch(ctx, spec, "start", func(ctx context.Context, q *QMP) error {
		st, err := q.QueryStatus(ctx)
		if err != nil {
			return err
		}
		if !st.Running {
			return fmt.Errorf("guest status is %q, want running", st.Status)
		}
		return nil
	})
}

// launch starts QEMU for spec and calls ready once QMP answers; with a
// non-nil incoming, QEMU waits for a migration stream (-incoming defer)
// that ready feeds it. verb names the operation in errors.
func (m *Monitor) launch(ctx context.Context, spec vmm.Spec, verb string, ready func(ctx context.Context, q *QMP) error, extra ...string) (h vmm.Handle, err error) {
	if err := spec.Validate(); err != nil {
		return vmm.Handle{}, err
	}
	fail := func(format string, a ...any) error {
		return fmt.Errorf("%s qemu for VM %q: %w", verb, spec.Name, fmt.Errorf(format, a...))
	}
	bin, err := exec.LookPath(m.Binary)
	if err != nil {
		return vmm.Handle{}, fail("%w (apt-get install qemu-system-x86)", err)
	}
	caps := m.hostCaps()
	plan, err := buildArgs(spec, caps)
	if err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	plan.args = append(plan.args, extra...)
	if err := os.MkdirAll(spec.RuntimeDir, 0o700); err != nil {
		return vmm.Handle{}, fail("create runtime dir: %w", err)
	}
	sockets := []string{plan.qmp}
	if plan.transport == vmm.TransportVirtioSerial {
		sockets = append(sockets, spec.AgentSocket)
	}
	for _, s := range sockets {
		if err := vmm.RemoveSocket(s); err != nil {
			return vmm.Handle{}, fail("stale socket: %w", err)
		}
	}

	proc, err := vmm.StartDetached(exec.Command(bin, plan.args...), spec.ConsoleLog) //nolint:gosec // binary is configuration; arguments are validated and escaped
	if err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	h = proc.Handle
	h.APISocket = plan.qmp
	h.AgentTransport = plan.transport
	if plan.transport == vmm.TransportVirtioSerial {
		h.AgentSocket = spec.AgentSocket
	} else {
		h.AgentCID = spec.VsockCID
	}
	defer func() {
		if err == nil {
			return
		}
		// QEMU refusing its arguments (a missing kernel, a busy tap) is
		// the common failure: say so first; the log says why.
		select { // QMP may notice the exit before the reaper does
		case <-proc.Done():
		case <-time.After(200 * time.Millisecond):
		}
		if exited := proc.Exited(); exited != nil {
			err = fmt.Errorf("%s qemu for VM %q: %w (while: %w)", verb, spec.Name, exited, err)
		}
		proc.Kill()
		for _, s := range sockets {
			_ = vmm.RemoveSocket(s)
		}
		err = fmt.Errorf("%w\nconsole log %s ends with:\n%s", err, spec.ConsoleLog, tail(spec.ConsoleLog, 10))
	}()

	sctx, cancel := context.WithTimeout(ctx, m.StartTimeout)
	defer cancel()
	if err := vmm.WaitForSocket(sctx, plan.qmp, proc.Exited); err != nil {
		return h, fail("QMP socket: %w", err)
	}
	if err := proc.Reidentify(); err != nil {
		return h, fail("%w", err)
	}
	h.Cmdline = proc.Handle.Cmdline
	q, err := DialQMP(sctx, plan.qmp)
	if err != nil {
		return h, fail("%w", err)
	}
	defer q.Close()
	if err := ready(sctx, q); err != nil {
		return h, fail("%w", err)
	}
	return h, nil
}

type plan struct {
	args      []string
	qmp       string
	transport string
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

// esc escapes a value for QEMU's comma-separated option syntax.
func esc(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// buildArgs turns a validated spec into QEMU's command line.
func buildArgs(spec vmm.Spec, caps vmm.Caps) (plan, error) {
	p := plan{qmp: filepath.Join(spec.RuntimeDir, QMPSocketName)}
	accel := spec.Accel
	if accel == "" {
		accel = "tcg"
		if caps.KVM {
			accel = "kvm"
		}
	}
	a := []string{"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"}
	if idRE.MatchString(spec.VMID) {
		a = append(a, "-name", "banger-"+spec.VMID)
	}
	switch accel {
	case "kvm":
		a = append(a, "-machine", "q35", "-accel", "kvm", "-cpu", "host")
	case "tcg":
		a = append(a, "-machine", "pc", "-accel", "tcg")
	}
	a = append(a,
		"-smp", strconv.Itoa(spec.CPUs),
		"-m", strconv.Itoa(spec.MemoryMiB)+"M",
		"-kernel", spec.Kernel,
		"-append", spec.Cmdline,
	)
	if spec.Initrd != "" {
		a = append(a, "-initrd", spec.Initrd)
	}
	a = append(a,
		"-chardev", "file,id=console,append=on,path="+esc(spec.ConsoleLog),
		"-serial", "chardev:console",
		"-chardev", "socket,id=qmp,server=on,wait=off,path="+esc(p.qmp),
		"-mon", "chardev=qmp,mode=control",
	)
	if spec.Disk != "" {
		driver := "file"
		if fi, err := os.Stat(spec.Disk); err == nil && fi.Mode().Type() == os.ModeDevice {
			driver = "host_device"
		}
		a = append(a,
			"-blockdev", "driver=raw,node-name=disk0,discard=unmap,file.driver="+driver+",file.filename="+esc(spec.Disk),
			"-device", "virtio-blk-pci,drive=disk0",
		)
	}
	if spec.Tap != "" {
		nic := "virtio-net-pci,netdev=net0"
		if spec.MAC != "" {
			nic += ",mac=" + spec.MAC
		}
		a = append(a, "-netdev", "tap,id=net0,ifname="+spec.Tap+",script=no,downscript=no", "-device", nic)
	}
	if caps.VhostVsock {
		p.transport = vmm.TransportVsock
		a = append(a, "-device", "vhost-vsock-pci,guest-cid="+strconv.FormatUint(uint64(spec.VsockCID), 10))
	} else {
		p.transport = vmm.TransportVirtioSerial
		a = append(a,
			"-device", "virtio-serial-pci",
			"-chardev", "socket,id=agent,server=on,wait=off,path="+esc(spec.AgentSocket),
			"-device", "virtserialport,chardev=agent,name="+vmm.AgentPortName,
		)
	}
	p.args = a
	return p, nil
}

// Stop implements vmm.Monitor: system_powerdown (ACPI power button), then
// QMP quit, then SIGTERM and SIGKILL.
func (m *Monitor) Stop(ctx context.Context, h vmm.Handle, graceful time.Duration) (vmm.StopMethod, error) {
	return vmm.StopVerified(h, "qemu", func() (vmm.StopMethod, error) { return m.stop(ctx, h, graceful) })
}

func (m *Monitor) stop(ctx context.Context, h vmm.Handle, graceful time.Duration) (vmm.StopMethod, error) {
	qmp := func(cmd string) {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		q, err := DialQMP(cctx, h.APISocket)
		if err != nil {
			return
		}
		defer q.Close()
		_ = q.Execute(cctx, cmd, nil, nil)
	}
	if graceful > 0 {
		qmp("system_powerdown")
		if vmm.WaitGone(ctx, h, graceful) {
			return vmm.StoppedGraceful, nil
		}
	}
	if ctx.Err() == nil {
		qmp("quit")
		if vmm.WaitGone(ctx, h, m.QuitWait) {
			return vmm.StoppedQuit, nil
		}
	}
	return vmm.Terminate(ctx, h, m.TermWait)
}

// Alive implements vmm.Monitor.
func (m *Monitor) Alive(h vmm.Handle) (bool, error) { return vmm.Alive(h) }

// Reattach implements vmm.Monitor: the process must be the recorded one and
// QMP must answer query-status.
func (m *Monitor) Reattach(ctx context.Context, h vmm.Handle) error {
	alive, err := vmm.Alive(h)
	if err != nil {
		return fmt.Errorf("reattach qemu pid %d: %w", h.PID, err)
	}
	if !alive {
		return fmt.Errorf("reattach qemu pid %d: %w", h.PID, vmm.ErrNotRunning)
	}
	q, err := DialQMP(ctx, h.APISocket)
	if err != nil {
		return fmt.Errorf("reattach qemu pid %d: %w", h.PID, err)
	}
	defer q.Close()
	st, err := q.QueryStatus(ctx)
	if err != nil {
		return fmt.Errorf("reattach qemu pid %d: %w", h.PID, err)
	}
	if st.Status == "shutdown" || st.Status == "internal-error" || st.Status == "guest-panicked" {
		return fmt.Errorf("reattach qemu pid %d: guest status %q: %w", h.PID, st.Status, errGuestDown)
	}
	return nil
}

var errGuestDown = errors.New("the guest is not running")

// tail returns the last n lines of a log file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path) //nolint:gosec // the VM's own console log
	if err != nil {
		return "(" + err.Error() + ")"
	}
	if len(b) > 64<<10 {
		b = b[len(b)-64<<10:]
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
