// Package qemu is banger's QEMU backend (qemu-system-x86_64), the one that
// boots guests on hosts without hardware KVM.
//
// Machine: with hardware KVM, q35 with -accel kvm; otherwise pc with TCG and
// virtio-pci devices (microvm under TCG can hang at TSC calibration, see
// shared/MACHINE.md), and, for a one-vCPU guest, acpi=noirq added to the
// kernel command line (PCI interrupt routing from SeaBIOS's $PIR table:
// evaluating the ACPI interrupt links cost the emulated guest 130-300 ms
// per PCI slot; with more vCPUs it would cost SMP, see tcgKernelArgs). Devices: a virtio-blk-pci disk (-blockdev, so a path
// is never parsed as a protocol), virtio-net-pci on the tap, virtio-rng-pci
// (entropy from the host, so the guest never waits on its pool), and the agent
// channel: vhost-vsock-pci when /dev/vhost-vsock exists, else a
// virtio-serial port named org.banger.agent on a Unix-socket chardev.
//
// QEMU runs under its seccomp sandbox (Sandbox), as Spec.RunAs when set,
// and opens no host path itself: the kernel and initrd (as sealed memfd
// copies), the disk, the tap, the vhost-vsock device and the listening
// sockets (QMP, agent, console) are descriptors the daemon opened. The
// serial console is a socket the daemon follows into the console log,
// capped and rotated (internal/consolelog); QEMU's own messages are
// appended to the log directly.
//
// -no-reboot makes a guest reboot end the VM, as it does under Firecracker:
// the daemon, not the guest, decides about restarts, and the VM shows as
// stopped. Control is QMP on <runtime>/qmp.sock.
//
// QEMU is started directly, detached with setsid, and not with -daemonize:
// the daemon then knows the pid at once (no pid file to race with or to
// trust) and reaps the child itself while it lives.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/consolelog"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/vmm"
)

// Name is the backend's registry name.
const Name = "qemu"

// QMPSocketName is the QMP socket's file name inside Spec.RuntimeDir.
const QMPSocketName = "qmp.sock"

// ConsoleSocketName is the serial console socket's file name inside
// Spec.RuntimeDir; the daemon follows it into the console log.
const ConsoleSocketName = "console.sock"

// Sandbox is QEMU's -sandbox setting: its seccomp filter, with the
// obsolete system calls, privilege changes (setuid and friends), process
// spawning (fork, exec) and resource control (scheduler, affinity) denied.
const Sandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

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
	sockets := plan.sockets()
	for _, s := range sockets {
		if err := vmm.RemoveSocket(s); err != nil {
			return vmm.Handle{}, fail("stale socket: %w", err)
		}
	}
	files, err := plan.open()
	if err != nil {
		for _, s := range sockets {
			_ = vmm.RemoveSocket(s)
		}
		return vmm.Handle{}, fail("%w", err)
	}
	// Connect to the console socket before QEMU runs: the connection waits
	// in the listen backlog, so not a byte of early boot output is lost.
	console, err := net.Dial("unix", plan.console)
	if err != nil {
		closeAll(files)
		for _, s := range sockets {
			_ = vmm.RemoveSocket(s)
		}
		return vmm.Handle{}, fail("connect console socket: %w", err)
	}
	if err := consolelog.FollowConn(plan.console, console, spec.ConsoleLog, spec.ConsoleLogMax); err != nil {
		closeAll(files)
		for _, s := range sockets {
			_ = vmm.RemoveSocket(s)
		}
		return vmm.Handle{}, fail("%w", err)
	}

	cmd := exec.Command(bin, plan.args...) //nolint:gosec // binary is configuration; arguments are validated and escaped
	cmd.ExtraFiles = files
	if spec.RunAs != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: spec.RunAs.UID, Gid: spec.RunAs.GID, Groups: []uint32{}}}
	}
	proc, err := vmm.StartDetached(cmd, spec.ConsoleLog)
	// QEMU has its own copies now. Closing ours matters: once QEMU exits,
	// nothing listens on the sockets any more, so a connection waiting in
	// their backlog (QMP, the console) fails at once instead of hanging.
	closeAll(files)
	if err != nil {
		_ = console.Close()
		for _, s := range sockets {
			_ = vmm.RemoveSocket(s)
		}
		return vmm.Handle{}, fail("%w", err)
	}
	h = proc.Handle
	h.APISocket = plan.qmp
	h.ConsoleSocket, h.ConsoleLog, h.ConsoleLogMax = plan.console, spec.ConsoleLog, spec.ConsoleLogMax
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
	console   string
	agent     string // the agent's listening socket (virtio-serial only)
	transport string
	// opens are the files QEMU gets as descriptors 3, 4, ... in order.
	opens []opening
}

// sockets are the Unix sockets the plan listens on.
func (p plan) sockets() []string {
	s := []string{p.qmp, p.console}
	if p.agent != "" {
		s = append(s, p.agent)
	}
	return s
}

// fd adds o to the files QEMU is given and returns its descriptor number.
func (p *plan) fd(o opening) string {
	p.opens = append(p.opens, o)
	return strconv.Itoa(2 + len(p.opens))
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

// esc escapes a value for QEMU's comma-separated option syntax.
func esc(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// buildArgs turns a validated spec into QEMU's command line.
func buildArgs(spec vmm.Spec, caps vmm.Caps) (plan, error) {
	p := plan{qmp: filepath.Join(spec.RuntimeDir, QMPSocketName), console: filepath.Join(spec.RuntimeDir, ConsoleSocketName)}
	accel := spec.Accel
	if accel == "" {
		accel = "tcg"
		if caps.KVM {
			accel = "kvm"
		}
	}
	a := []string{"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"}
	cmdline := spec.Cmdline
	if idRE.MatchString(spec.VMID) {
		a = append(a, "-name", "banger-"+spec.VMID)
	}
	switch accel {
	case "kvm":
		a = append(a, "-machine", "q35", "-accel", "kvm", "-cpu", "host")
	case "tcg":
		a = append(a, "-machine", "pc", "-accel", "tcg")
		if spec.CPUs <= 1 {
			cmdline = withTCGKernelArgs(cmdline)
		}
	}
	// QEMU opens no host path itself: every file, socket and device is a
	// descriptor the daemon opened (so an unprivileged QEMU needs no access
	// to banger's dirs). -kernel and -initrd take a path, so they name the
	// inherited descriptor through /proc/self/fd; the descriptors are
	// read-only in-memory copies (memfd), which the QEMU user may reopen.
	// Every path is a descriptor now, so name the runtime dir in the
	// command line another way: the daemon's identity check and its orphan
	// scan recognize a VM's monitor by an argument under its runtime dir.
	// A secret object holds a string and does nothing else.
	a = append(a, "-object", "secret,id=banger-runtime,data="+esc(p.qmp))
	a = append(a,
		"-sandbox", Sandbox,
		"-smp", strconv.Itoa(spec.CPUs),
		"-m", strconv.Itoa(spec.MemoryMiB)+"M",
		"-kernel", "/proc/self/fd/"+p.fd(opening{kind: openCopy, path: spec.Kernel}),
		"-append", cmdline,
	)
	if spec.Initrd != "" {
		a = append(a, "-initrd", "/proc/self/fd/"+p.fd(opening{kind: openCopy, path: spec.Initrd}))
	}
	a = append(a,
		"-chardev", "socket,id=console,server=on,wait=off,fd="+p.fd(opening{kind: openListen, path: p.console}),
		"-serial", "chardev:console",
		"-chardev", "socket,id=qmp,server=on,wait=off,fd="+p.fd(opening{kind: openListen, path: p.qmp}),
		"-mon", "chardev=qmp,mode=control",
	)
	// An entropy source for the guest (QEMU's built-in backend: the host's
	// getrandom, no host path): without one, under emulation, the first
	// guest process that needs randomness at boot (the agent or sshd
	// making a host key) waits seconds for the kernel's pool.
	a = append(a, "-device", "virtio-rng-pci")
	if spec.Disk != "" {
		driver := "file"
		if fi, err := os.Stat(spec.Disk); err == nil && fi.Mode().Type() == os.ModeDevice {
			driver = "host_device"
		}
		a = append(a,
			"-add-fd", "fd="+p.fd(opening{kind: openRW, path: spec.Disk})+",set=1,opaque=disk0",
			"-blockdev", "driver=raw,node-name=disk0,discard=unmap,file.driver="+driver+",file.filename=/dev/fdset/1",
			"-device", "virtio-blk-pci,drive=disk0",
		)
	}
	if spec.Tap != "" {
		nic := "virtio-net-pci,netdev=net0"
		if spec.MAC != "" {
			nic += ",mac=" + spec.MAC
		}
		a = append(a, "-netdev", "tap,id=net0,fd="+p.fd(opening{kind: openTap, path: spec.Tap}), "-device", nic)
	}
	if caps.VhostVsock {
		p.transport = vmm.TransportVsock
		a = append(a, "-device", "vhost-vsock-pci,guest-cid="+strconv.FormatUint(uint64(spec.VsockCID), 10)+
			",vhostfd="+p.fd(opening{kind: openRW, path: "/dev/vhost-vsock"}))
	} else {
		p.transport = vmm.TransportVirtioSerial
		p.agent = spec.AgentSocket
		a = append(a,
			"-device", "virtio-serial-pci",
			"-chardev", "socket,id=agent,server=on,wait=off,fd="+p.fd(opening{kind: openListen, path: spec.AgentSocket}),
			"-device", "virtserialport,chardev=agent,name="+guestabi.AgentSerialPort,
		)
	}
	p.args = a
	return p, nil
}

// tcgKernelArgs are added to the kernel command line of a guest on the
// emulated pc machine. acpi=noirq routes PCI interrupts through the BIOS's
// $PIR table (SeaBIOS has one) instead of evaluating the ACPI interrupt
// links: under TCG enabling each link (one per PCI slot in use, four with
// the disk, NIC, agent port and rng) took 130-300 ms of the initramfs's
// module loading, and virtio uses MSI-X anyway.
//
// It is for one vCPU only: with acpi=noirq the kernel registers no IO-APIC
// from the MADT, and Debian's kernel has no MP-table parser to fall back
// on, so it finds no SMP configuration and boots on one CPU whatever -smp
// says. A two-vCPU systemd guest then ran its userspace about 2x slower
// (14.9 s against 7.2 s to the sshd banner).
var tcgKernelArgs = []string{"acpi=noirq"}

// withTCGKernelArgs adds to cmdline each of tcgKernelArgs whose key it
// does not set, before a "--" that starts init's arguments.
func withTCGKernelArgs(cmdline string) string {
	kernel, initArgs, hasInit := cmdline, "", false
	if i := strings.Index(" "+cmdline+" ", " -- "); i >= 0 {
		kernel, initArgs, hasInit = strings.TrimRight(cmdline[:max(i-1, 0)], " "), cmdline[i:], true
	}
	for _, arg := range tcgKernelArgs {
		key, _, _ := strings.Cut(arg, "=")
		set := false
		for _, w := range strings.Fields(kernel) {
			if k, _, _ := strings.Cut(w, "="); k == key {
				set = true
			}
		}
		if !set {
			kernel = strings.TrimSpace(kernel + " " + arg)
		}
	}
	if hasInit {
		return kernel + " " + strings.TrimLeft(initArgs, " ")
	}
	return kernel
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
	if h.ConsoleSocket != "" {
		// The console went unread while no daemon ran; follow it again.
		if err := consolelog.FollowSocket(h.ConsoleSocket, h.ConsoleLog, h.ConsoleLogMax); err != nil {
			return fmt.Errorf("reattach qemu pid %d: %w", h.PID, err)
		}
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
