// Package supervisor keeps one running VM company for as long as its monitor
// runs: it watches the monitor process, runs the boot waiter, and holds the
// VM's one agent session.
//
// The session is the single channel to the guest agent that every host-side
// user shares: the boot waiter, the graceful stop, and the capabilities that
// come next (exec, cp and ssh over the agent, port forwards, mounts,
// snapshots). They take it with Session and hand it back with DropSession
// when a call on it fails; none of them dials the agent itself.
//
// A supervisor owns no host resource and changes no record on its own
// account: when the monitor exits, or the guest never becomes ready, it
// calls back into its owner (Hooks), which releases the VM and records the
// outcome.
package supervisor

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/vmm"
)

// pollInterval is how often the watcher checks the monitor process.
const pollInterval = 300 * time.Millisecond

// Hooks are the owner's answers to what a supervisor notices.
type Hooks struct {
	// Exited runs when the monitor process exits on its own (guest
	// poweroff, crash, a kill from outside) while the supervisor runs.
	Exited func(s *Supervisor)
	// Boot is the boot waiter of a VM that is starting; nil for a VM that
	// is already running. Its error is what Ready reports.
	Boot func(ctx context.Context, s *Supervisor) error
}

// Supervisor watches one VM. Make it with Start; end it with Close.
type Supervisor struct {
	vm       model.VM
	mon      vmm.Monitor
	handle   vmm.Handle
	dial     agent.DialFunc
	cancel   context.CancelFunc
	stopping atomic.Bool
	ready    chan struct{}
	readyErr error

	sessMu  sync.Mutex
	session *agent.Client
	closed  bool
}

// Start supervises vm, whose monitor is mon with handle h and whose agent
// is reached with dial. The watcher and the boot waiter run until ctx ends
// or Detach is called.
func Start(ctx context.Context, vm model.VM, mon vmm.Monitor, h vmm.Handle, dial agent.DialFunc, hooks Hooks) *Supervisor {
	ctx, cancel := context.WithCancel(ctx)
	s := &Supervisor{vm: vm, mon: mon, handle: h, dial: dial, cancel: cancel, ready: make(chan struct{})}
	go s.watch(ctx, hooks.Exited)
	if hooks.Boot == nil {
		close(s.ready)
		return s
	}
	go func() {
		s.readyErr = hooks.Boot(ctx, s)
		close(s.ready)
	}()
	return s
}

// VM is the record the supervisor was started with.
func (s *Supervisor) VM() model.VM { return s.vm }

// Handle is the supervised monitor's handle.
func (s *Supervisor) Handle() vmm.Handle { return s.handle }

// Ready is closed when the boot waiter has ended (at once for a VM that was
// already running); ReadyErr then says whether the guest became ready.
func (s *Supervisor) Ready() <-chan struct{} { return s.ready }

// ReadyErr is the boot waiter's result, valid once Ready is closed.
func (s *Supervisor) ReadyErr() error { return s.readyErr }

// Detach ends the watcher and the boot waiter but keeps the agent session
// for a graceful stop. The owner calls it before it stops or removes the
// VM itself, so that the watcher does not take the monitor's exit for a
// crash.
func (s *Supervisor) Detach() {
	s.stopping.Store(true)
	s.cancel()
}

// Close detaches the supervisor and closes its agent session; Session
// fails from then on.
func (s *Supervisor) Close() {
	s.Detach()
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	s.closed = true
	if s.session != nil {
		_ = s.session.Close()
		s.session = nil
	}
}

// Stopping reports whether Detach (or Close) was called.
func (s *Supervisor) Stopping() bool { return s.stopping.Load() }

// ErrStopped is returned by Session once the supervisor is closed.
var ErrStopped = errors.New("the VM is no longer supervised")

// Session returns the VM's agent session, dialing it when there is none
// (or the last one was dropped or went idle). A session held from before is
// checked with a health call first, so a caller gets a live one or an
// error. The session is shared: callers never close it, and hand it back
// with DropSession when a call on it fails.
func (s *Supervisor) Session(ctx context.Context) (*agent.Client, error) {
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	if s.closed {
		return nil, ErrStopped
	}
	if s.session != nil {
		if _, err := s.session.Health(ctx); err == nil {
			return s.session, nil
		}
		_ = s.session.Close()
		s.session = nil
	}
	c, err := s.dial(ctx)
	if err != nil {
		return nil, err
	}
	s.session = c
	return c, nil
}

// DropSession closes c if it still is the session, so that the next
// Session dials afresh.
func (s *Supervisor) DropSession(c *agent.Client) {
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	if c != nil && s.session == c {
		_ = c.Close()
		s.session = nil
	}
}

// watch polls the monitor process and calls exited once when it is gone.
func (s *Supervisor) watch(ctx context.Context, exited func(*Supervisor)) {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if alive, err := s.mon.Alive(s.handle); err != nil || alive {
			continue
		}
		if ctx.Err() == nil && !s.Stopping() && exited != nil {
			exited(s)
		}
		return
	}
}

// Set is the supervisors of the running VMs, by VM id.
type Set struct {
	mu sync.Mutex
	m  map[string]*Supervisor
}

// Put records s as the supervisor of VM id, stopping one it replaces.
func (set *Set) Put(id string, s *Supervisor) {
	set.mu.Lock()
	old := set.m[id]
	if set.m == nil {
		set.m = map[string]*Supervisor{}
	}
	set.m[id] = s
	set.mu.Unlock()
	if old != nil && old != s {
		old.Close()
	}
}

// Get returns the supervisor of VM id, or nil when the VM is not running.
func (set *Set) Get(id string) *Supervisor {
	set.mu.Lock()
	defer set.mu.Unlock()
	return set.m[id]
}

// Take removes and returns the supervisor of VM id (nil when none).
func (set *Set) Take(id string) *Supervisor {
	set.mu.Lock()
	defer set.mu.Unlock()
	s := set.m[id]
	delete(set.m, id)
	return s
}

// Remove removes s if it still is the supervisor of VM id.
func (set *Set) Remove(id string, s *Supervisor) {
	set.mu.Lock()
	defer set.mu.Unlock()
	if set.m[id] == s {
		delete(set.m, id)
	}
}
