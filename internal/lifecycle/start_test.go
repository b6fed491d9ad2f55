package lifecycle

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/failpoint"
	"github.com/bangerdev/banger/internal/lifecycle/lifecycletest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
)

// newService returns a Service over a fresh state dir whose Firecracker is
// the fake, and a kernel file for specs.
func newService(t *testing.T) (*Service, string) {
	t.Helper()
	base := t.TempDir()
	cfg, kernel := lifecycletest.Config(t, base)
	st, err := store.Open(cfg.DBPath(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	bg, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		_ = st.Close()
	})
	return New(Options{Config: cfg, Store: st, Logger: slog.Default(), Background: bg}), kernel
}

// TestStartConfirmFailureLeavesNoMonitor arms the start:confirm failpoint:
// the monitor starts, but recording its handle fails. The start must stop
// that monitor and move the VM to error with its resources released; no
// monitor may be left running, and none unsupervised. (The old code
// returned early when the StartedAt update failed, leaving the monitor
// running and the VM starting with nothing watching it.)
func TestStartConfirmFailureLeavesNoMonitor(t *testing.T) {
	s, kernel := newService(t)
	var leftovers []vmm.Handle
	t.Cleanup(func() {
		for _, h := range leftovers {
			_, _ = firecracker.New().Stop(context.Background(), h, 0)
		}
	})
	restore := failpoint.Arm("start:confirm=error")
	defer restore()

	id := model.NewID()
	vm := model.VM{ID: id, Name: "confirm-fails", State: model.VMStarting, VMM: firecracker.Name, DiskDriver: "copy",
		CPUs: 1, MemoryMiB: 128, Created: time.Now().UTC(),
		Runtime: model.Runtime{Phase: "runtime-dir", RuntimeDir: s.RuntimeDir(id), ConsoleLog: s.ConsoleLog(id)}}
	if err := s.store.CreateVM(&vm, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{s.RuntimeDir(id), s.VMDir(id)} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	mon, err := s.Monitor(firecracker.Name)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := s.NetConfig()
	if err != nil {
		t.Fatal(err)
	}
	run := &startRun{vm: vm, mon: mon, kernel: kernel, nc: nc, log: s.log, began: time.Now()}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	sup, err := s.runStart(ctx, run, nil, s.launchMonitor)
	if !errors.Is(err, failpoint.ErrInjected) {
		t.Fatalf("runStart with start:confirm=error: err %v, want the injected failure", err)
	}
	if sup != nil {
		t.Error("a failed start returned a supervisor")
	}
	if procs := vmm.FindMonitors(s.MonitorPrograms(), s.RuntimeDirs())[id]; len(procs) != 0 {
		leftovers = append(leftovers, procs...)
		t.Fatalf("a monitor of the failed start still runs: %+v", procs)
	}
	if s.Supervisor(id) != nil {
		t.Error("the failed start left a supervisor registered")
	}
	got, err := s.store.GetVM(id)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != model.VMError || !strings.Contains(got.Reason, "injected failure") {
		t.Errorf("after the failed start: state %s reason %q, want error naming the injected failure", got.State, got.Reason)
	}
	if !got.Runtime.Empty() || got.Runtime.Monitor.PID != 0 {
		t.Errorf("after the failed start the record still holds a runtime: %+v", got.Runtime)
	}
	if _, err := os.Stat(s.RuntimeDir(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("runtime dir after the failed start: %v, want it removed", err)
	}

	// Disarmed, the same step confirms the monitor and the VM is supervised.
	restore()
	if _, err := s.SetState(id, model.VMStarting, "", func(v *model.VM) {
		v.Runtime = model.Runtime{Phase: "runtime-dir", RuntimeDir: s.RuntimeDir(id), ConsoleLog: s.ConsoleLog(id)}
	}); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(s.RuntimeDir(id), 0o700); err != nil {
		t.Fatal(err)
	}
	if run.vm, err = s.store.GetVM(id); err != nil {
		t.Fatal(err)
	}
	sup, err = s.runStart(ctx, run, nil, s.launchMonitor)
	if err != nil {
		t.Fatalf("runStart without the failpoint: %v", err)
	}
	got, _ = s.store.GetVM(id)
	leftovers = append(leftovers, got.Runtime.Monitor)
	if got.Runtime.Monitor.PID == 0 || got.StartedAt.IsZero() || got.KernelCmdline == "" {
		t.Errorf("confirmed start: pid %d started_at %v cmdline %q, want all recorded", got.Runtime.Monitor.PID, got.StartedAt, got.KernelCmdline)
	}
	if alive, _ := vmm.Alive(got.Runtime.Monitor); !alive || sup == nil || s.Supervisor(id) != sup {
		t.Errorf("confirmed start: monitor alive %v, supervisor %v; want both", alive, sup != nil)
	}
	if sup != nil {
		sup.Close()
	}
}
