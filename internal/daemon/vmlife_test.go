package daemon

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
)

// TestStartConfirmFailureLeavesNoMonitor arms the start:confirm failpoint:
// the monitor starts, but recording its handle fails. The start must stop
// that monitor and move the VM to error with its resources released; no
// monitor may be left running, and none unwatched. (The old code returned
// early when the StartedAt update failed, leaving the monitor running and
// the VM starting with nothing watching it.)
func TestStartConfirmFailureLeavesNoMonitor(t *testing.T) {
	r := newRig(t)
	d := r.start()
	failpoints = map[string]bool{"start:confirm=error": true}
	t.Cleanup(func() { failpoints = nil })

	id := newID()
	vm := model.VM{ID: id, Name: "confirm-fails", State: model.VMStarting, VMM: firecracker.Name, DiskDriver: "copy",
		CPUs: 1, MemoryMiB: 128, Created: time.Now().UTC(),
		Runtime: model.Runtime{Phase: "runtime-dir", RuntimeDir: r.rtDir(id), ConsoleLog: d.consoleLog(id)}}
	if err := d.store.CreateVM(&vm, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{r.rtDir(id), r.vmDir(id)} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	mon, err := d.monitor(firecracker.Name)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := d.netConfig()
	if err != nil {
		t.Fatal(err)
	}
	run := &startRun{vm: vm, mon: mon, kernel: r.kernel, nc: nc, log: d.log, began: time.Now()}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	l, err := d.runStart(ctx, run, nil, d.launchMonitor)
	if !errors.Is(err, ErrInjected) {
		t.Fatalf("runStart with start:confirm=error: err %v, want the injected failure", err)
	}
	if l != nil {
		t.Error("a failed start returned a supervisor")
	}
	if procs := d.monitorProcs()[id]; len(procs) != 0 {
		r.mons = append(r.mons, procs...)
		t.Fatalf("a monitor of the failed start still runs: %+v", procs)
	}
	if got := d.lives.take(id); got != nil {
		t.Error("the failed start left a watcher registered")
	}
	got := r.get(d, id)
	if got.State != model.VMError || !strings.Contains(got.Reason, "injected failure") {
		t.Log(r.log.String())
		t.Errorf("after the failed start: state %s reason %q, want error naming the injected failure", got.State, got.Reason)
	}
	if !got.Runtime.Empty() || got.Runtime.PID != 0 {
		t.Errorf("after the failed start the record still holds a runtime: %+v", got.Runtime)
	}
	if _, err := os.Stat(r.rtDir(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("runtime dir after the failed start: %v, want it removed", err)
	}

	// Disarmed, the same step confirms the monitor and the VM is watched.
	failpoints = nil
	if _, err := d.setState(id, model.VMStarting, "", func(v *model.VM) {
		v.Runtime = model.Runtime{Phase: "runtime-dir", RuntimeDir: r.rtDir(id), ConsoleLog: d.consoleLog(id)}
	}); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(r.rtDir(id), 0o700); err != nil {
		t.Fatal(err)
	}
	run.vm = r.get(d, id)
	l, err = d.runStart(ctx, run, nil, d.launchMonitor)
	if err != nil {
		t.Fatalf("runStart without the failpoint: %v", err)
	}
	got = r.get(d, id)
	r.mons = append(r.mons, handleOf(got.Runtime))
	if got.Runtime.PID == 0 || got.StartedAt.IsZero() || got.KernelCmdline == "" {
		t.Errorf("confirmed start: pid %d started_at %v cmdline %q, want all recorded", got.Runtime.PID, got.StartedAt, got.KernelCmdline)
	}
	if alive, _ := vmm.Alive(handleOf(got.Runtime)); !alive || l == nil {
		t.Errorf("confirmed start: monitor alive %v, watcher %v; want both", alive, l != nil)
	}
	if w := d.lives.take(id); w != nil {
		w.stopping = true
		w.cancel()
	}
}
