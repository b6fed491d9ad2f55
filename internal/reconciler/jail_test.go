package reconciler

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/lifecycle/lifecycletest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer"
)

// TestReconcileJailed: start-up recovery with Firecracker under the
// (fake) jailer. A live jailed VM is re-adopted with its jail; a dead
// one's jail is removed with its cgroups; a start that died before the
// monitor's pid was recorded has its monitor (found by its root, the
// chroot) killed and its jail removed; the jail of a VM no record names is
// removed, monitor and all; a dir in the chroot base without banger's
// marker is left alone.
func TestReconcileJailed(t *testing.T) {
	testutil.RequiresRoot(t)
	r := newRig(t)
	short, err := os.MkdirTemp("/tmp", "bjr") // sockets in the chroot must fit sun_path
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(short) })
	cgv := 1
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		cgv = 2
	}
	r.cfg.FirecrackerJailer = &jailer.Config{Binary: lifecycletest.FakeJailer(t), UID: 65534, GID: 65534,
		ChrootBase: filepath.Join(short, "jail"), CgroupVersion: cgv}
	jm := func() *firecracker.Monitor {
		m := firecracker.New()
		m.Binary = r.cfg.FirecrackerBinary
		m.Jailer = r.cfg.Jailer()
		return m
	}
	var started []vmm.Handle
	t.Cleanup(func() {
		for _, h := range started {
			_, _ = jm().Stop(context.Background(), h, 0)
		}
	})
	start := func(id string) model.Runtime {
		t.Helper()
		if err := os.MkdirAll(r.vmDir(id), 0o700); err != nil {
			t.Fatal(err)
		}
		spec := vmm.Spec{VMID: id, Name: id, CPUs: 1, MemoryMiB: 128, Kernel: r.kernel, RuntimeDir: r.rtDir(id),
			ConsoleLog: filepath.Join(r.vmDir(id), "console.log"), VsockCID: 3}
		h, err := jm().Start(context.Background(), spec)
		if err != nil {
			b, _ := os.ReadFile(spec.ConsoleLog)
			t.Fatalf("start jailed fake firecracker for %s: %v\n%s", id, err, b)
		}
		started = append(started, h)
		return model.Runtime{Phase: "running", Monitor: h, RuntimeDir: r.rtDir(id), ConsoleLog: spec.ConsoleLog}
	}
	jailOf := func(h vmm.Handle) string { return h.Jail }

	liveID := model.NewID()
	live := r.vmWithID(liveID, "live", model.VMRunning, start(liveID), false)
	r.handles(liveID, handlesJSON(t, liveID, live.Runtime))

	deadID := model.NewID()
	deadRT := start(deadID)
	dead := r.vmWithID(deadID, "dead", model.VMRunning, deadRT, false)
	if err := syscall.Kill(deadRT.Monitor.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !vmm.WaitGone(context.Background(), deadRT.Monitor, 10*time.Second) {
		t.Fatal("killed monitor still alive")
	}

	strayID := model.NewID()
	strayRT := start(strayID)
	stray := r.vmWithID(strayID, "stray", model.VMStarting, model.Runtime{Phase: "vmm:starting", RuntimeDir: r.rtDir(strayID)}, false)

	orphanID := model.NewID()
	orphanRT := start(orphanID)

	foreign := filepath.Join(r.cfg.Jailer().ChrootBase, "banger-fake-firecracker", "not-bangers", "root")
	if err := os.MkdirAll(foreign, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(foreign, "keep"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}

	d := r.start()
	logs := r.log.String()

	got := r.get(d, live.ID)
	if got.State != model.VMRunning || got.Recovery.ReadoptedAt.IsZero() || got.Runtime.Monitor.Jail != jailOf(live.Runtime.Monitor) {
		t.Errorf("live jailed VM: state %s readopted %v jail %q; want running, re-adopted, jail %q\n%s",
			got.State, got.Recovery.ReadoptedAt, got.Runtime.Monitor.Jail, live.Runtime.Monitor.Jail, logs)
	}
	if alive, _ := vmm.Alive(live.Runtime.Monitor); !alive {
		t.Error("the live jailed monitor is gone")
	}
	if _, err := os.Stat(live.Runtime.Monitor.Jail); err != nil {
		t.Errorf("the live VM's jail: %v", err)
	}
	for name, h := range map[string]vmm.Handle{"dead": dead.Runtime.Monitor, "stray": strayRT.Monitor, "orphan": orphanRT.Monitor} {
		if alive, _ := vmm.Alive(h); alive {
			t.Errorf("%s: monitor pid %d still runs", name, h.PID)
		}
		if _, err := os.Lstat(h.Jail); err == nil {
			t.Errorf("%s: jail %s left\n%s", name, h.Jail, logs)
		}
		for _, v := range []int{1, 2} {
			mounts, _ := jailer.CgroupMounts(v)
			for _, m := range mounts {
				if _, err := os.Stat(filepath.Join(m, jailer.ParentCgroup, filepath.Base(h.Jail))); err == nil {
					t.Errorf("%s: cgroup %s left", name, filepath.Join(m, jailer.ParentCgroup, filepath.Base(h.Jail)))
				}
			}
		}
	}
	if got := r.get(d, stray.ID); got.State == model.VMStarting {
		t.Errorf("stray: still starting after recovery")
	}
	if _, err := os.Stat(filepath.Join(foreign, "keep")); err != nil {
		t.Errorf("a dir without banger's marker was touched: %v", err)
	}
}
