package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/consolelog"
)

// Process is a monitor process this daemon started. Its Done channel closes
// when the process has exited and been reaped.
type Process struct {
	Handle Handle // PID, PIDStart, BootID and Cmdline filled in
	cmd    *exec.Cmd
	done   chan struct{}
	mu     sync.Mutex
	err    error // Wait's result, valid after done
}

// Done is closed once the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// ExitErr is the process's exit status (nil for exit 0); valid after Done.
func (p *Process) ExitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Exited returns an error when the process has already exited, for use as
// the check function of WaitForSocket.
func (p *Process) Exited() error {
	select {
	case <-p.done:
		err := p.ExitErr()
		if err == nil {
			err = errors.New("exit status 0")
		}
		return fmt.Errorf("VM monitor exited early: %w", err)
	default:
		return nil
	}
}

// Kill ends the process with SIGKILL and waits until it is reaped. It is
// for a Start that failed: while the daemon is the parent, the pid cannot
// be reused before the reaper has waited, so no identity check is needed.
func (p *Process) Kill() {
	_ = p.cmd.Process.Kill() // "already finished" is fine
	<-p.done
}

// Reidentify reads the command line again, for programs that exec another
// (a wrapper such as the jailer or `ip netns exec`): call it once the
// monitor answers on its socket, and persist the handle after.
func (p *Process) Reidentify() error {
	argv, err := procCmdline(p.Handle.PID)
	if err != nil {
		return err
	}
	p.Handle.Cmdline = argv
	return nil
}

// StartDetached starts cmd in a new session (setsid), with stdin from
// /dev/null and stdout and stderr appended to consoleLog, so the process
// outlives a daemon restart and its output lands in the VM's log. A
// goroutine reaps the child when it exits, so no zombie is left while the
// daemon lives; after a daemon restart the orphan is reaped by init.
//
// cmd must not be started. Its context, if any, is ignored for the process's
// lifetime: a VM outlives the request that started it.
func StartDetached(cmd *exec.Cmd, consoleLog string) (*Process, error) {
	logf, err := os.OpenFile(consoleLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open console log: %w", err)
	}
	defer logf.Close()
	return StartDetachedOutput(cmd, logf)
}

// StartDetachedOutput is StartDetached with stdout and stderr going to out
// (for example the write end of a console pipe; see consolelog.OpenFIFO).
// The caller keeps out and closes it after.
func StartDetachedOutput(cmd *exec.Cmd, out *os.File) (*Process, error) {
	cmd.Stdin = nil // /dev/null
	cmd.Stdout = out
	cmd.Stderr = out
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setsid = true
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	p := &Process{cmd: cmd, done: make(chan struct{})}
	// The reaper gets the identity through a channel, not from p.Handle,
	// which the caller may still change (Reidentify) while the process runs.
	identified := make(chan Handle, 1)
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		if h := <-identified; h.PID != 0 {
			recordExit(h, err, cmd.ProcessState)
		}
		close(p.done)
	}()
	// exec has succeeded when Start returns, so /proc shows the new program.
	h, err := Identify(cmd.Process.Pid)
	if err != nil {
		identified <- Handle{}
		_ = cmd.Process.Kill()
		<-p.done
		return nil, fmt.Errorf("identify started process %d: %w", cmd.Process.Pid, err)
	}
	p.Handle = h
	identified <- h
	return p, nil
}

// exits holds how the monitors this daemon started and reaped ended, for the
// supervisor, which notices an exit by the pid going away: "exit status 1",
// "signal: killed". Each entry is read once (ExitStatus); the map is capped.
var exits = struct {
	sync.Mutex
	m map[exitKey]string
}{m: map[exitKey]string{}}

type exitKey struct {
	pid   int
	start uint64
}

const maxExits = 256

func recordExit(h Handle, err error, st *os.ProcessState) {
	what := "exit status 0"
	switch {
	case st != nil:
		what = st.String()
		if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			what = fmt.Sprintf("killed by signal %d (%s)", int(ws.Signal()), unix.SignalName(ws.Signal()))
		}
	case err != nil:
		what = err.Error()
	}
	exits.Lock()
	defer exits.Unlock()
	if len(exits.m) >= maxExits {
		clear(exits.m)
	}
	exits.m[exitKey{h.PID, h.PIDStart}] = what
}

// ExitStatus says how the monitor process of h ended ("exit status 1",
// "killed by signal 9 (SIGKILL)"), when this daemon started and reaped it.
// It waits up to wait for the reaper, which may lag the pid's disappearance
// from /proc by a moment. ok is false for a process this daemon did not
// start (a re-adopted monitor, whose parent is init).
func ExitStatus(h Handle, wait time.Duration) (status string, ok bool) {
	deadline := time.Now().Add(wait)
	for {
		exits.Lock()
		status, ok = exits.m[exitKey{h.PID, h.PIDStart}]
		if ok {
			delete(exits.m, exitKey{h.PID, h.PIDStart})
		}
		exits.Unlock()
		if ok || time.Now().After(deadline) {
			return status, ok
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Identify reads what identifies a running process: its start time, the
// boot id and its command line.
func Identify(pid int) (Handle, error) {
	_, start, err := procStat(pid)
	if err != nil {
		return Handle{}, err
	}
	boot, err := BootID()
	if err != nil {
		return Handle{}, err
	}
	argv, err := procCmdline(pid)
	if err != nil {
		return Handle{}, err
	}
	return Handle{PID: pid, PIDStart: start, BootID: boot, Cmdline: argv}, nil
}

// BootID returns /proc/sys/kernel/random/boot_id, which changes at every boot.
func BootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("read boot id: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// procStat returns the state (field 3) and start time (field 22) of pid. The
// command name (field 2) may hold spaces and parentheses, so parsing starts
// after the last ')'.
func procStat(pid int) (state byte, start uint64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, fmt.Errorf("read stat of pid %d: %w", pid, err)
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parse stat of pid %d: no ')'", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); field 22 is fields[19].
	if len(fields) < 20 || len(fields[0]) != 1 {
		return 0, 0, fmt.Errorf("parse stat of pid %d: %d fields after comm", pid, len(fields))
	}
	start, err = strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("parse start time of pid %d: %w", pid, err)
	}
	return fields[0][0], start, nil
}

func procCmdline(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, fmt.Errorf("read cmdline of pid %d: %w", pid, err)
	}
	b = bytes.TrimSuffix(b, []byte{0})
	if len(b) == 0 {
		return nil, nil // zombie or kernel thread
	}
	return strings.Split(string(b), "\x00"), nil
}

// Alive reports whether h's process runs and is the process h was made for:
// same boot, same start time, same command line, and not a zombie. A
// vanished pid is (false, nil); only unexpected read failures are errors.
func Alive(h Handle) (bool, error) {
	if h.PID <= 0 {
		return false, nil
	}
	boot, err := BootID()
	if err != nil {
		return false, err
	}
	if boot != h.BootID {
		return false, nil
	}
	state, start, err := procStat(h.PID)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if start != h.PIDStart || state == 'Z' || state == 'X' || state == 'x' {
		return false, nil
	}
	argv, err := procCmdline(h.PID)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return slices.Equal(argv, h.Cmdline), nil
}

// Signal sends sig to h's process if, and only if, it is still that
// process. It opens a pidfd first and checks identity after, so the signal
// cannot reach a process that reused the pid in between. It returns an error
// wrapping ErrNotRunning when the process is gone.
func Signal(h Handle, sig syscall.Signal) error {
	if h.PID <= 0 {
		return fmt.Errorf("signal pid %d: %w", h.PID, ErrNotRunning)
	}
	fd, err := unix.PidfdOpen(h.PID, 0)
	if errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("signal pid %d: %w", h.PID, ErrNotRunning)
	}
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", h.PID, err)
	}
	defer unix.Close(fd)
	alive, err := Alive(h)
	if err != nil {
		return fmt.Errorf("signal pid %d: %w", h.PID, err)
	}
	if !alive {
		return fmt.Errorf("signal pid %d: %w", h.PID, ErrNotRunning)
	}
	if err := unix.PidfdSendSignal(fd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("signal pid %d: %w", h.PID, ErrNotRunning)
		}
		return fmt.Errorf("send %v to pid %d: %w", sig, h.PID, err)
	}
	return nil
}

// WaitGone waits until h's process is no longer alive, up to timeout or the
// end of ctx. It reports whether the process is gone.
func WaitGone(ctx context.Context, h Handle, timeout time.Duration) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if alive, err := Alive(h); err == nil && !alive {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-deadline.C:
			alive, err := Alive(h)
			return err == nil && !alive
		case <-tick.C:
		}
	}
}

// Terminate ends h's process with SIGTERM, then SIGKILL after termWait. It
// is the tail every backend's Stop shares once the gentle paths have failed.
// ctx's end skips straight to SIGKILL.
func Terminate(ctx context.Context, h Handle, termWait time.Duration) (StopMethod, error) {
	if ctx.Err() == nil {
		if err := Signal(h, syscall.SIGTERM); errors.Is(err, ErrNotRunning) {
			return StoppedTerm, nil
		} else if err != nil {
			return "", err
		}
		if WaitGone(ctx, h, termWait) {
			return StoppedTerm, nil
		}
	}
	if err := Signal(h, syscall.SIGKILL); errors.Is(err, ErrNotRunning) {
		return StoppedKill, nil
	} else if err != nil {
		return "", err
	}
	// SIGKILL cannot be ignored; wait for the kernel to tear the process
	// down even if ctx has ended, but not forever.
	if !WaitGone(context.Background(), h, 10*time.Second) {
		return "", fmt.Errorf("pid %d survived SIGKILL for 10s", h.PID)
	}
	return StoppedKill, nil
}

// RemoveSocket removes a Unix socket the monitor created; a missing file is
// fine. It refuses to remove anything that is not a socket.
func RemoveSocket(path string) error {
	if path == "" {
		return nil
	}
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove socket: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("remove socket %s: not a socket (%v)", path, fi.Mode().Type())
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove socket: %w", err)
	}
	return nil
}

// StopVerified is the common frame of a backend's Stop: it does nothing
// (StoppedAlready) unless h's process is alive and is the one Start
// launched, runs the backend's escalation stop, then removes the VM's
// sockets. backend names the monitor in errors.
func StopVerified(h Handle, backend string, stop func() (StopMethod, error)) (StopMethod, error) {
	alive, err := Alive(h)
	if err != nil {
		return "", fmt.Errorf("stop %s pid %d: %w", backend, h.PID, err)
	}
	if !alive {
		// Gone, or the pid belongs to someone else now: touch nothing.
		// Stale sockets are removed by the next Start.
		return StoppedAlready, nil
	}
	how, err := stop()
	if err != nil {
		return "", fmt.Errorf("stop %s pid %d: %w", backend, h.PID, err)
	}
	for _, s := range []string{h.APISocket, h.AgentSocket} {
		if err := RemoveSocket(s); err != nil {
			return how, err
		}
	}
	if err := consolelog.RemoveFIFO(h.ConsoleFIFO); err != nil {
		return how, err
	}
	return how, nil
}

// FindMonitors lists the running processes of the given monitor programs
// (matched by the base name of argv[0]) that have an argument naming a
// path inside dir/<id>/, and returns their identities by <id>. The daemon
// passes its VMs' runtime dir, so that start-up finds the monitors of starts
// that died before recording the pid, and the orphan scan those of VMs it
// no longer knows. The calling process is never listed.
func FindMonitors(programs []string, dir string) map[string][]Handle {
	progs := map[string]bool{}
	for _, p := range programs {
		progs[filepath.Base(p)] = true
	}
	prefix := filepath.Clean(dir) + "/"
	out := map[string][]Handle{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 1 || pid == self {
			continue
		}
		argv, err := procCmdline(pid)
		if err != nil || len(argv) == 0 || !progs[filepath.Base(argv[0])] {
			continue
		}
		id := ""
		for _, a := range argv[1:] {
			if i := strings.Index(a, prefix); i >= 0 {
				rest := a[i+len(prefix):]
				if j := strings.IndexByte(rest, '/'); j > 0 {
					id = rest[:j]
					break
				}
			}
		}
		if id == "" {
			continue
		}
		h, err := Identify(pid)
		if err != nil || !slices.Equal(h.Cmdline, argv) {
			continue // gone or changed meanwhile
		}
		out[id] = append(out[id], h)
	}
	return out
}
