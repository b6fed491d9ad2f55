// Package adoption holds the end-to-end test of restart safety with a real
// QEMU guest: re-adoption across a daemon restart, crash rounds during
// start and stop, and a simulated host reboot.
package adoption

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// TestE2ERestartQEMU boots a real QEMU TCG guest and checks, in order:
//   - re-adoption: the guest keeps running across a daemon restart
//     (SIGTERM, start again), banger ssh works before and after (the same
//     guest boot), vm inspect shows the re-adoption, and vm stop works after;
//   - crash rounds with QEMU: the daemon killed at start:recorded (the
//     restarted daemon resumes the boot waiter; the VM becomes running and
//     ssh works), at a random time during a graceful stop, and at start:vmm
//     (QEMU runs with its pid unrecorded: the restarted daemon kills it),
//     with the leak checks after each;
//   - a simulated host reboot (BANGER_TEST_BOOT_ID): the running VM is
//     stopped, its QEMU gone and its runtime state cleared.
func TestE2ERestartQEMU(t *testing.T) {
	e := e2etest.Setup(t, nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	check := func(what string) {
		t.Helper()
		e2etest.WaitSettled(ctx, t, d, 4*time.Minute)
		e2etest.WithStore(t, d, func(_ *store.Store, recs []model.VM) {
			for _, s := range e2etest.Leaks(t, e, recs) {
				t.Errorf("%s: %s", what, s)
			}
		})
	}

	// Re-adoption.
	d.MustCLI(ctx, "vm", "run", "--image", e.Image, "--name", "keep", "--memory", "768M", "--cpus", "2")
	before := e2etest.Inspect(ctx, t, d, "keep")
	bootID := strings.TrimSpace(d.MustCLI(ctx, "ssh", "keep", "--", "cat", "/proc/sys/kernel/random/boot_id"))
	d.Stop()
	h := vmm.Handle{PID: before.Runtime.Monitor.PID, PIDStart: before.Runtime.Monitor.PIDStart, BootID: before.Runtime.Monitor.BootID, Cmdline: before.Runtime.Monitor.Cmdline}
	if alive, _ := vmm.Alive(h); !alive {
		t.Fatalf("QEMU pid %d died with the daemon", h.PID)
	}
	d.Start()
	after := e2etest.Inspect(ctx, t, d, "keep")
	if after.State != model.VMRunning || after.Runtime.Monitor.PID != before.Runtime.Monitor.PID || after.Recovery.ReadoptedAt.IsZero() {
		t.Fatalf("after restart: state %s pid %d readopted %v, want running, pid %d, re-adopted", after.State, after.Runtime.Monitor.PID, after.Recovery.ReadoptedAt, before.Runtime.Monitor.PID)
	}
	if text := d.MustCLI(ctx, "vm", "inspect", "keep"); !strings.Contains(text, "re-adopted at") {
		t.Errorf("banger vm inspect shows no re-adoption:\n%s", text)
	}
	if got := strings.TrimSpace(d.MustCLI(ctx, "ssh", "keep", "--", "cat", "/proc/sys/kernel/random/boot_id")); got != bootID {
		t.Errorf("guest boot id %q after the daemon restart, want %q: the guest rebooted", got, bootID)
	}
	d.MustCLI(ctx, "vm", "stop", "keep")
	if vm := e2etest.Inspect(ctx, t, d, "keep"); vm.State != model.VMStopped {
		t.Errorf("vm stop after re-adoption: state %s", vm.State)
	}
	if alive, _ := vmm.Alive(h); alive {
		t.Errorf("QEMU pid %d still runs after vm stop", h.PID)
	}
	check("after re-adoption and stop")

	// Crash round 1: killed after the pid is recorded, before the boot
	// waiter; the restarted daemon resumes it.
	crashAt := func(fp string, args ...string) {
		t.Helper()
		d.Stop()
		d.StartEnv(map[string]string{"BANGER_FAILPOINT": fp})
		logBefore := len(d.Log())
		d.CLI(ctx, args...)
		d.Kill()
		if !strings.Contains(d.Log()[logBefore:], "failpoint "+fp+" reached") {
			t.Fatalf("failpoint %s not reached", fp)
		}
		d.Start()
	}
	crashAt("start:recorded", "vm", "start", "keep", "--wait")
	e2etest.WaitSettled(ctx, t, d, 4*time.Minute)
	if vm := e2etest.Inspect(ctx, t, d, "keep"); vm.State != model.VMRunning || vm.Recovery.ReadoptedAt.IsZero() {
		t.Fatalf("after a crash during boot: state %s (%s) readopted %v, want running and re-adopted", vm.State, vm.Reason, vm.Recovery.ReadoptedAt)
	}
	d.MustCLI(ctx, "ssh", "keep", "--", "true")
	check("crash at start:recorded")

	// Crash round 2: killed at a random time during a graceful stop.
	done := make(chan e2etest.Result, 1)
	go func() { done <- d.CLI(ctx, "vm", "stop", "keep") }()
	time.Sleep(time.Duration(200+time.Now().UnixNano()%1500) * time.Millisecond)
	d.Kill()
	<-done
	d.Start()
	check("crash during stop")

	// Crash round 3: QEMU started, its pid not recorded.
	if vm := e2etest.Inspect(ctx, t, d, "keep"); vm.State == model.VMRunning {
		d.MustCLI(ctx, "vm", "stop", "keep")
	}
	crashAt("start:vmm", "vm", "start", "keep", "--wait")
	if !strings.Contains(d.Log(), "stray monitor pid") {
		t.Errorf("no log of the stray QEMU being killed")
	}
	check("crash at start:vmm")

	// Simulated reboot.
	d.MustCLI(ctx, "vm", "start", "keep", "--wait")
	running := e2etest.Inspect(ctx, t, d, "keep")
	d.Stop()
	logBefore := len(d.Log())
	d.StartEnv(map[string]string{"BANGER_TEST_BOOT_ID": "00000000-0000-4000-8000-00000000b007"})
	vm := e2etest.Inspect(ctx, t, d, "keep")
	if vm.State != model.VMStopped || !vm.Runtime.Empty() || vm.Recovery.CleanedAt.IsZero() {
		t.Errorf("after a reboot: state %s runtime %+v cleaned %v, want stopped, cleared", vm.State, vm.Runtime, vm.Recovery.CleanedAt)
	}
	if !strings.Contains(d.Log()[logBefore:], "VM stopped at start-up: the host rebooted") {
		t.Errorf("no log line for the reboot")
	}
	rh := vmm.Handle{PID: running.Runtime.Monitor.PID, PIDStart: running.Runtime.Monitor.PIDStart, BootID: running.Runtime.Monitor.BootID, Cmdline: running.Runtime.Monitor.Cmdline}
	if alive, _ := vmm.Alive(rh); alive {
		t.Errorf("QEMU pid %d still runs after the simulated reboot", rh.PID)
	}
	check("after a simulated reboot")
	d.MustCLI(ctx, "vm", "rm", "keep")
}
