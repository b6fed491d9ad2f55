package supervisor

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/vmm"
)

// monitor is a vmm.Monitor whose process lives until killed.
type monitor struct {
	vmm.Monitor
	alive atomic.Bool
}

func (m *monitor) Alive(vmm.Handle) (bool, error) { return m.alive.Load(), nil }

var errNoAgent = errors.New("no agent here")

func noAgent(context.Context) (*agent.Client, error) { return nil, errNoAgent }

// TestWatcherReportsExitOnce: a monitor that dies is reported once; one
// that dies after Detach is not reported at all.
func TestWatcherReportsExitOnce(t *testing.T) {
	m := &monitor{}
	m.alive.Store(true)
	exited := make(chan *Supervisor, 2)
	s := Start(context.Background(), model.VM{ID: "a"}, m, vmm.Handle{PID: 42}, noAgent, Hooks{Exited: func(s *Supervisor) { exited <- s }})
	defer s.Close()
	select {
	case <-s.Ready():
	default:
		t.Fatal("a supervisor without a boot waiter is not ready at once")
	}
	m.alive.Store(false)
	select {
	case got := <-exited:
		if got != s {
			t.Fatal("Exited was called with another supervisor")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the monitor's exit was not reported within 5s")
	}
	select {
	case <-exited:
		t.Fatal("the exit was reported twice")
	case <-time.After(3 * pollInterval):
	}

	m2 := &monitor{}
	m2.alive.Store(true)
	s2 := Start(context.Background(), model.VM{ID: "b"}, m2, vmm.Handle{PID: 43}, noAgent, Hooks{Exited: func(s *Supervisor) { exited <- s }})
	s2.Detach()
	m2.alive.Store(false)
	select {
	case <-exited:
		t.Fatal("a detached supervisor reported the monitor's exit")
	case <-time.After(3 * pollInterval):
	}
	if !s2.Stopping() {
		t.Error("Stopping() = false after Detach")
	}
}

// TestBootWaiterAndSession: Ready closes with the boot waiter's result;
// Session passes the dial error on and fails once the supervisor is
// closed.
func TestBootWaiterAndSession(t *testing.T) {
	m := &monitor{}
	m.alive.Store(true)
	booted := errors.New("not ready")
	s := Start(context.Background(), model.VM{ID: "c", State: model.VMStarting}, m, vmm.Handle{PID: 44}, noAgent,
		Hooks{Boot: func(ctx context.Context, s *Supervisor) error {
			_, err := s.Session(ctx)
			if !errors.Is(err, errNoAgent) {
				t.Errorf("Session: %v, want the dial error", err)
			}
			return booted
		}})
	select {
	case <-s.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("the boot waiter did not end")
	}
	if !errors.Is(s.ReadyErr(), booted) {
		t.Errorf("ReadyErr = %v, want the boot waiter's error", s.ReadyErr())
	}
	s.Close()
	if _, err := s.Session(context.Background()); !errors.Is(err, ErrStopped) {
		t.Errorf("Session after Close: %v, want ErrStopped", err)
	}
}

// TestSetReplaces: putting a second supervisor for a VM closes the first.
func TestSetReplaces(t *testing.T) {
	m := &monitor{}
	m.alive.Store(true)
	var set Set
	a := Start(context.Background(), model.VM{ID: "d"}, m, vmm.Handle{}, noAgent, Hooks{})
	b := Start(context.Background(), model.VM{ID: "d"}, m, vmm.Handle{}, noAgent, Hooks{})
	defer b.Close()
	set.Put("d", a)
	set.Put("d", b)
	if !a.Stopping() {
		t.Error("the replaced supervisor is still running")
	}
	if set.Get("d") != b {
		t.Error("Get does not return the new supervisor")
	}
	set.Remove("d", a) // not the current one: no effect
	if set.Take("d") != b || set.Get("d") != nil {
		t.Error("Take did not remove the supervisor")
	}
}
