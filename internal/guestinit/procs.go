package guestinit

import (
	"fmt"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// procs starts children and reaps every process that ends up a child of
// PID 1, orphans included. Nothing else in PID 1 may wait for a process:
// a second waiter would steal exit statuses.
type procs struct {
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
	// orphan is told about reaped processes nobody waits for.
	orphan func(pid int, ws unix.WaitStatus)
}

func newProcs() *procs { return &procs{waiters: map[int]chan unix.WaitStatus{}} }

// start runs path with argv and attr; the channel gets its wait status.
func (p *procs) start(path string, argv []string, attr *syscall.ProcAttr) (int, <-chan unix.WaitStatus, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pid, err := syscall.ForkExec(path, argv, attr)
	if err != nil {
		return 0, nil, fmt.Errorf("start %s: %w", path, err)
	}
	ch := make(chan unix.WaitStatus, 1)
	p.waiters[pid] = ch
	return pid, ch, nil
}

// reap collects every exited child without blocking. Call it on SIGCHLD.
func (p *procs) reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		// start holds mu from fork to registration, so a child that exits
		// at once is still matched to its waiter.
		p.mu.Lock()
		ch, ok := p.waiters[pid]
		delete(p.waiters, pid)
		p.mu.Unlock()
		if ok {
			ch <- ws
		} else if p.orphan != nil {
			p.orphan(pid, ws)
		}
	}
}

// describe says how a process ended.
func describe(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return "killed by " + unix.SignalName(ws.Signal())
	}
	return fmt.Sprintf("wait status %#x", uint32(ws))
}
