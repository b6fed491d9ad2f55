package guestinit

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/guestinit/selection"
)

// sigPoweroff is SIGRTMIN+4 as systemd counts it (glibc's SIGRTMIN is 34):
// banger's PID 1 powers off on it, as systemd does, so the agent and
// tools that know systemd's convention work unchanged.
const sigPoweroff = syscall.Signal(34 + 4)

// Shutdown timing: SIGTERM to every process, up to termGrace for them to
// exit, SIGKILL, up to killGrace more.
const (
	termGrace = 3 * time.Second
	killGrace = time.Second
	netWait   = 10 * time.Second
)

// pid1 is banger's init for images without systemd.
type pid1 struct {
	version string
	cmdline guestabi.Cmdline
	procs   *procs
	self    string // this program, to start the agent

	logMu   sync.Mutex
	logFile *os.File // guestabi.InitLog, once / is writable

	stopping atomic.Bool
	mainMu   sync.Mutex
	main     guestabi.MainState
	sshdPath string
	haveNet  bool
	// firstBootPending: the sshd install must be tried once the network
	// is up (firstBootEarly could not settle it).
	firstBootPending bool
}

// RunPID1 is banger's PID 1. It never returns: it brings the guest up
// (mounts, hostname, network, agent, sshd, main process), reaps every
// orphan, and powers off on the agent's shutdown request (SIGRTMIN+4),
// SIGTERM, SIGUSR2, SIGPWR or Ctrl-Alt-Del (SIGINT).
func RunPID1(version string) {
	execImageInit()
	p := &pid1{version: version, procs: newProcs(), self: "/proc/self/exe"}
	p.procs.orphan = func(pid int, ws unix.WaitStatus) {
		if p.cmdline.Debug {
			p.logf("reaped orphan %d (%s)", pid, describe(ws))
		}
	}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGTERM, unix.SIGINT, unix.SIGUSR2, unix.SIGPWR, sigPoweroff, unix.SIGHUP)
	// Ctrl-Alt-Del sends SIGINT to PID 1 instead of rebooting at once.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)

	func() {
		defer func() {
			if r := recover(); r != nil {
				p.failf("internal error", fmt.Errorf("%v", r))
			}
		}()
		p.boot()
	}()

	for sig := range sigs {
		switch sig {
		case unix.SIGCHLD:
			p.procs.reap()
		case unix.SIGHUP:
			// ignored: PID 1 has no terminal to lose
		default:
			if p.stopping.CompareAndSwap(false, true) {
				go p.shutdown(signalName(sig) + " received")
			}
		}
	}
}

// execImageInit applies the init rule when the kernel started banger's
// init directly (init=guestabi.InitPath, no initramfs to choose): an image
// whose init is systemd gets it, unless banger.init=banger. After the
// initramfs chose banger's init the rule gives the same answer again.
func execImageInit() {
	if !mounted("/proc") {
		_ = os.MkdirAll("/proc", 0o555)
		_ = unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	}
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return
	}
	c, _ := guestabi.Parse(string(b))
	if c.Choice() == guestabi.InitBanger {
		return
	}
	dec, err := selection.Choose("/", c.Choice(), "")
	if err != nil || dec.Init != guestabi.InitImage {
		return
	}
	fmt.Fprintf(os.Stdout, "banger-init: starting the image's init %s: %s\n", dec.Path, dec.Reason)
	err = unix.Exec(dec.Path, append([]string{dec.Path}, c.InitArgs...), os.Environ())
	fmt.Fprintf(os.Stdout, "banger-init: execute the image's init %s: %v; running banger's init instead\n", dec.Path, err)
}

// boot runs the start-up steps. A failed step prints its line and the
// boot goes on: the agent keeps the VM reachable whatever else failed.
func (p *pid1) boot() {
	if err := mountSystem(); err != nil {
		p.failf("mount", err)
	}
	p.openLog()
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		p.failf("read /proc/cmdline", err)
	}
	// A malformed key is reported; the keys that parsed are still used.
	p.cmdline, err = guestabi.Parse(string(b))
	if err != nil {
		p.failf("parse kernel command line", err)
	}
	p.logf("banger-init %s starting as PID 1 (kernel up %s)", p.version, uptime())
	if err := writeFileAtomic(guestabi.InitFile, []byte(string(guestabi.InitBanger)+"\n"), 0o644); err != nil {
		p.failf("record init", err)
	}
	p.setMain(guestabi.MainState{Status: guestabi.MainStarting})

	// First boot's state is known at once unless it needs the network, so
	// the host need not wait for it.
	p.sshdPath = findSSHD()
	p.firstBootEarly()
	// The agent starts first: it needs no network, and the host waits for
	// it; the host names and the network are set up while it starts.
	go p.supervise("agent", func() (int, <-chan unix.WaitStatus, error) {
		return p.procs.start(p.self, []string{"banger-vsock-agent"}, &syscall.ProcAttr{
			Dir: "/", Env: []string{"PATH=" + defaultPath}, Files: []uintptr{devNull(), 1, 2},
			Sys: &syscall.SysProcAttr{Setsid: true},
		})
	})
	if err := upLoopback(); err != nil {
		p.failf("network", err)
	}
	var dns []string
	for _, a := range p.cmdline.Network.DNS {
		dns = append(dns, a.String())
	}
	if err := writeNameFiles("/", p.cmdline.Hostname, dns); err != nil {
		p.failf("hostname", err)
	}
	if n := p.cmdline.Network; n.Configured() {
		iface, err := configureNetwork(n, netWait)
		if err != nil {
			p.failf("network", err)
		} else {
			p.haveNet = n.Gateway.IsValid()
			p.logf("network: %s on %s via %s", n.Address, iface, n.Gateway)
		}
	}
	go p.firstBootAndSSHD()
	go p.watchPowerButton()
	p.waitForFolders(folderWait)
	p.startMain()
}

// folderWait bounds how long the main process waits for the agent to
// mount the VM's host folders.
const folderWait = 10 * time.Second

// waitForFolders returns once every host folder on the command line
// (guestabi.KeyMounts) is a mount point, which the agent makes them as it
// starts, so the main process finds them in place (its accesses then wait
// until the host serves them); or after d, saying which are missing.
func (p *pid1) waitForFolders(d time.Duration) {
	if len(p.cmdline.Mounts) == 0 {
		return
	}
	deadline := time.Now().Add(d)
	for {
		var missing []string
		points := mountPoints()
		for _, m := range p.cmdline.Mounts {
			if !slices.Contains(points, m.Dir) {
				missing = append(missing, m.Dir)
			}
		}
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			p.logf("host folders %s not mounted after %s: starting the main process without them", strings.Join(missing, ", "), d)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// supervise keeps a service running until shutdown, restarting it one
// second after it exits.
func (p *pid1) supervise(name string, start func() (int, <-chan unix.WaitStatus, error)) {
	for !p.stopping.Load() {
		pid, done, err := start()
		if err != nil {
			p.failf("start "+name, err)
		} else {
			ws := <-done
			if p.stopping.Load() {
				return
			}
			p.failf(name, fmt.Errorf("process %d ended (%s); restarting it", pid, describe(ws)))
		}
		time.Sleep(time.Second)
	}
}

// openLog opens guestabi.InitLog for append; PID 1's lines go there and
// to the console.
func (p *pid1) openLog() {
	if err := os.MkdirAll("/var/log", 0o755); err != nil {
		return
	}
	f, err := os.OpenFile(guestabi.InitLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		p.failf("open "+guestabi.InitLog, err)
		return
	}
	p.logMu.Lock()
	p.logFile = f
	p.logMu.Unlock()
}

func (p *pid1) closeLog() {
	p.logMu.Lock()
	defer p.logMu.Unlock()
	if p.logFile != nil {
		_ = p.logFile.Close()
		p.logFile = nil
	}
}

func (p *pid1) logf(format string, args ...any) {
	line := "banger-init: " + oneLine(fmt.Sprintf(format, args...)) + "\n"
	p.logMu.Lock()
	defer p.logMu.Unlock()
	_, _ = io.WriteString(os.Stdout, line)
	if p.logFile != nil {
		_, _ = io.WriteString(p.logFile, line)
	}
}

// failf prints the one-line failure report: banger-init: <what>: <why>.
func (p *pid1) failf(what string, err error) { p.logf("%s: %v", what, err) }

// setMain records the main process's state in guestabi.MainStateFile.
func (p *pid1) setMain(st guestabi.MainState) {
	p.mainMu.Lock()
	defer p.mainMu.Unlock()
	p.main = st
	b, err := json.Marshal(st)
	if err == nil {
		err = writeFileAtomic(guestabi.MainStateFile, append(b, '\n'), 0o644)
	}
	if err != nil {
		p.failf("record main process state", err)
	}
}

var (
	nullOnce sync.Once
	nullFile *os.File // kept open for the life of PID 1
)

// devNull is a descriptor of /dev/null for children's stdin, or the
// console's when /dev/null cannot be opened.
func devNull() uintptr {
	nullOnce.Do(func() { nullFile, _ = os.OpenFile("/dev/null", os.O_RDWR, 0) })
	if nullFile == nil {
		return 0
	}
	return nullFile.Fd()
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func oneLineErr(err error) string {
	if err == nil {
		return ""
	}
	return strings.Join(strings.Fields(err.Error()), " ")
}

// signalName names a signal as kill -l does, SIGRTMIN+4 included.
func signalName(sig os.Signal) string {
	s, ok := sig.(syscall.Signal)
	if !ok {
		return sig.String()
	}
	if s == sigPoweroff {
		return "SIGRTMIN+4 (power off)"
	}
	if n := unix.SignalName(s); n != "" {
		return n
	}
	return fmt.Sprintf("signal %d", int(s))
}

var errNoMain = errors.New("the image has neither Entrypoint nor Cmd")

// uptime is how long the kernel has been up (/proc/uptime), for the
// console lines that time the boot; "?" when unknown.
func uptime() string {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0] + " s"
}
