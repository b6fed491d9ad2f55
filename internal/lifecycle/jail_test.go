package lifecycle

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/failpoint"
	"github.com/bangerdev/banger/internal/lifecycle/lifecycletest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer"
)

// TestJailedStartAndRelease: with firecracker_jailer configured, a VM's
// start runs Firecracker through the (fake) jailer: the record's handle
// names the jail, the monitor runs inside it as the VM's own uid and gid
// (id_range: the jailer's base plus the index of its address); a start
// whose confirmation fails leaves no monitor and no jail; Release of the
// started VM stops it and removes its jail and cgroups.
func TestJailedStartAndRelease(t *testing.T) {
	testutil.RequiresRoot(t)
	s, kernel := newService(t)
	short, err := os.MkdirTemp("/tmp", "bjl") // sockets in the chroot must fit sun_path
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(short) })
	clearStaleJails(t)
	cgv := 1
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		cgv = 2
	}
	s.cfg.FirecrackerJailer = &jailer.Config{Binary: lifecycletest.FakeJailer(t), UID: 200000, GID: 300000,
		ChrootBase: filepath.Join(short, "jail"), CgroupVersion: cgv, IDRange: 1 << 16}
	if err := s.cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var started []vmm.Handle
	t.Cleanup(func() {
		mon, _ := s.Monitor(firecracker.Name)
		for _, h := range started {
			_, _ = mon.Stop(context.Background(), h, 0)
		}
	})
	id := model.NewID()
	jail := filepath.Join(short, "jail", "banger-fake-firecracker", id)
	// Whatever a failure midway left in the jail goes too: the monitor
	// (its parent is init, it would outlive the test) and its cgroups.
	t.Cleanup(func() { removeJail(filepath.Join(short, "jail"), jail) })
	fresh := func() model.VM {
		t.Helper()
		for _, dir := range []string{s.RuntimeDir(id), s.VMDir(id)} {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				t.Fatal(err)
			}
		}
		vm, err := s.store.GetVM(id)
		if err != nil {
			t.Fatal(err)
		}
		return vm
	}
	vm := model.VM{ID: id, Name: "jailed", State: model.VMStarting, VMM: firecracker.Name, DiskDriver: "copy",
		CPUs: 1, MemoryMiB: 128, Created: time.Now().UTC(), IP: "172.30.0.7",
		Runtime: model.Runtime{Phase: "runtime-dir", RuntimeDir: s.RuntimeDir(id), ConsoleLog: s.ConsoleLog(id)}}
	if err := s.store.CreateVM(&vm, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	mon, err := s.Monitor(firecracker.Name)
	if err != nil {
		t.Fatal(err)
	}
	if mon.(*firecracker.Monitor).Jailer == nil {
		t.Fatal("the service's Firecracker monitor has no jailer")
	}
	nc, err := s.NetConfig()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// A start whose confirmation fails: no monitor, no jail.
	restore := failpoint.Arm("start:confirm=error")
	run := &startRun{vm: fresh(), mon: mon, kernel: kernel, nc: nc, log: s.log, began: time.Now()}
	if _, err := s.runStart(ctx, run, nil, s.launchMonitor); !errors.Is(err, failpoint.ErrInjected) {
		t.Fatalf("runStart with start:confirm=error: %v, want the injected failure", err)
	}
	restore()
	if _, err := os.Lstat(jail); err == nil {
		t.Errorf("jail %s left by the failed start", jail)
	}
	if jailer.InUse(filepath.Join(jail, "root")) {
		t.Error("a process still runs in the failed start's jail")
	}

	if _, err := s.SetState(id, model.VMStarting, "", func(v *model.VM) {
		v.Runtime = model.Runtime{Phase: "runtime-dir", RuntimeDir: s.RuntimeDir(id), ConsoleLog: s.ConsoleLog(id)}
	}); err != nil {
		t.Fatal(err)
	}
	run = &startRun{vm: fresh(), mon: mon, kernel: kernel, nc: nc, log: s.log, began: time.Now()}
	sup, err := s.runStart(ctx, run, nil, s.launchMonitor)
	if err != nil {
		t.Fatalf("jailed start: %v", err)
	}
	if sup != nil {
		sup.Close()
	}
	got, _ := s.store.GetVM(id)
	h := got.Runtime.Monitor
	started = append(started, h)
	if h.Jail != jail || !strings.HasPrefix(h.APISocket, jail+"/root/") {
		t.Fatalf("recorded handle: jail %q api %q; want the jail %s", h.Jail, h.APISocket, jail)
	}
	if !jailer.RootIs(h.PID, filepath.Join(jail, "root")) {
		t.Errorf("monitor pid %d is not inside the jail", h.PID)
	}
	// id_range: the VM at 172.30.0.7 runs as uid 200000+7, gid 300000+7.
	status, _ := os.ReadFile("/proc/" + strconv.Itoa(h.PID) + "/status")
	if !strings.Contains(string(status), "\nUid:\t200007\t200007\t200007\t200007\n") ||
		!strings.Contains(string(status), "\nGid:\t300007\t300007\t300007\t300007\n") {
		t.Errorf("the jailed monitor of the VM at .7 does not run as 200007:300007:\n%s", status)
	}
	if own, refused := s.OwnRuntime(id, got.Runtime); len(refused) > 0 || own.Monitor.PID != h.PID {
		t.Errorf("OwnRuntime refuses the jailed monitor: %v", refused)
	}

	if _, err := s.Release(ctx, got, false); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if alive, _ := vmm.Alive(h); alive {
		t.Error("the jailed monitor runs after Release")
	}
	if _, err := os.Lstat(jail); err == nil {
		t.Errorf("jail %s left after Release", jail)
	}
	for _, v := range []int{1, 2} {
		mounts, _ := jailer.CgroupMounts(v)
		for _, m := range mounts {
			if _, err := os.Stat(filepath.Join(m, jailer.ParentCgroup, id)); err == nil {
				t.Errorf("cgroup %s left after Release", filepath.Join(m, jailer.ParentCgroup, id))
			}
		}
	}
}

// removeJail kills what runs in the jail dir of base and removes the jail
// and its cgroups.
func removeJail(base, dir string) {
	jailer.KillInside(filepath.Join(dir, "root"))
	if inv, err := jailer.FromJailDir(base, dir); err == nil {
		_ = jailer.Remove(inv)
	}
}

// clearStaleJails removes the jails a killed run of this test left in
// /tmp/bjl* (its monitors run on as init's children, in their cgroups).
func clearStaleJails(t *testing.T) {
	dirs, _ := filepath.Glob("/tmp/bjl*/jail/banger-fake-firecracker/*")
	for _, dir := range dirs {
		if parentAlive(filepath.Join(dir, "root")) {
			continue // a run of this test going on now
		}
		base := filepath.Dir(filepath.Dir(dir))
		t.Logf("removing the stale jail %s of an earlier run", dir)
		removeJail(base, dir)
		_ = os.RemoveAll(filepath.Dir(base))
	}
}

// parentAlive reports whether a process in the jail root has a parent
// other than init: the test that started it still runs.
func parentAlive(root string) bool {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !jailer.RootIs(pid, root) {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces and parentheses.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) > 1 && f[1] != "1" {
			return true
		}
	}
	return false
}
