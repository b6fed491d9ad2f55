package reconciler

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/lifecycle"
	"github.com/bangerdev/banger/internal/lifecycle/lifecycletest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/google/go-cmp/cmp"
)

// These tests run without root: the VM monitors are banger-fake-firecracker
// processes (real processes, real sockets, the Firecracker API), the VMs
// hold no tap or loop, and the store is the real one. The root-only halves
// (real taps, loops, a daemon process in a network namespace) are in
// test/e2e/restart_test.go and crash_test.go.

// syncBuffer is a log sink safe for the daemon's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// rig is a state dir prepared for a daemon start: records written to the
// store, fake monitors running, files in place.
type rig struct {
	t      testing.TB
	cfg    config.Config
	st     *store.Store
	kernel string
	mons   []vmm.Handle // every fake started, stopped at the end
	log    *syncBuffer
}

func newRig(t testing.TB) *rig {
	t.Helper()
	base, err := os.MkdirTemp("", "banger-reconcile-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	cfg, kernel := lifecycletest.Config(t, base)
	st, err := store.Open(cfg.DBPath(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, cfg: cfg, st: st, kernel: kernel, log: &syncBuffer{}}
	t.Cleanup(func() {
		m := firecracker.New()
		for _, h := range r.mons {
			_, _ = m.Stop(context.Background(), h, 0)
		}
	})
	return r
}

func (r *rig) rtDir(id string) string { return filepath.Join(r.cfg.RuntimeDir, "vms", id) }
func (r *rig) vmDir(id string) string { return filepath.Join(r.cfg.VMsDir(), id) }

// monitor starts a fake Firecracker for VM id, as startVM would, and
// returns the runtime startVM would have recorded.
func (r *rig) monitor(id string) model.Runtime {
	r.t.Helper()
	m := firecracker.New()
	m.Binary = r.cfg.FirecrackerBinary
	if err := os.MkdirAll(r.vmDir(id), 0o700); err != nil {
		r.t.Fatal(err)
	}
	spec := vmm.Spec{VMID: id, Name: id, CPUs: 1, MemoryMiB: 128, Kernel: r.kernel, RuntimeDir: r.rtDir(id),
		ConsoleLog: filepath.Join(r.vmDir(id), "console.log"), VsockCID: 3}
	h, err := m.Start(context.Background(), spec)
	if err != nil {
		r.t.Fatalf("start fake firecracker for %s: %v", id, err)
	}
	r.mons = append(r.mons, h)
	return model.Runtime{Phase: "running", Monitor: h, RuntimeDir: r.rtDir(id), ConsoleLog: spec.ConsoleLog}
}

// deadMonitor starts a fake and stops it: its runtime names a process that
// is gone.
func (r *rig) deadMonitor(id string) model.Runtime {
	r.t.Helper()
	rt := r.monitor(id)
	if _, err := firecracker.New().Stop(context.Background(), rt.Monitor, 0); err != nil {
		r.t.Fatal(err)
	}
	if err := os.MkdirAll(r.rtDir(id), 0o700); err != nil {
		r.t.Fatal(err)
	}
	return rt
}

// vm stores a VM record.
func (r *rig) vm(name string, st model.VMState, rt model.Runtime, lease bool) model.VM {
	r.t.Helper()
	return r.vmWithID(model.NewID(), name, st, rt, lease)
}

func (r *rig) vmWithID(id, name string, st model.VMState, rt model.Runtime, lease bool) model.VM {
	r.t.Helper()
	vm := model.VM{ID: id, Name: name, State: st, VMM: firecracker.Name, DiskDriver: "copy", CPUs: 1, MemoryMiB: 128,
		Created: time.Now().UTC(), Runtime: rt}
	var subnet netip.Prefix
	if lease {
		subnet = netip.MustParsePrefix(r.cfg.Subnet)
	}
	if err := r.st.CreateVM(&vm, subnet); err != nil {
		r.t.Fatal(err)
	}
	return vm
}

// handles writes raw as the VM's handles.json.
func (r *rig) handles(id string, raw []byte) {
	r.t.Helper()
	if err := os.MkdirAll(r.rtDir(id), 0o700); err != nil {
		r.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(r.rtDir(id), "handles.json"), raw, 0o600); err != nil {
		r.t.Fatal(err)
	}
}

func handlesJSON(t testing.TB, id string, rt model.Runtime) []byte {
	t.Helper()
	raw, err := json.Marshal(lifecycle.Handles{VMID: id, Written: time.Now().UTC(), Runtime: rt})
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// daemon is what a daemon start-up makes of the rig's state dir: the
// lifecycle service and the reconciler over the reopened store.
type daemon struct {
	*Reconciler
	store  *store.Store
	cancel context.CancelFunc
}

func (d *daemon) close() {
	d.cancel()
	_ = d.store.Close()
}

func (d *daemon) loadHandles(id string) (model.Runtime, error) { return d.Life.LoadHandles(id) }
func (d *daemon) writeHandles(vm model.VM) error               { return d.Life.WriteHandles(vm) }
func (d *daemon) vmRuntimeDir(id string) string                { return d.Life.RuntimeDir(id) }
func (d *daemon) vmDir(id string) string                       { return d.Life.VMDir(id) }
func (d *daemon) ownRuntime(id string, rt model.Runtime) (model.Runtime, []string) {
	return d.Life.OwnRuntime(id, rt)
}

// newDaemon wires the services over cfg and st (nil: no store, for the
// checks that read only files).
func newDaemon(cfg config.Config, st *store.Store, log *slog.Logger) *daemon {
	bg, cancel := context.WithCancel(context.Background())
	life := lifecycle.New(lifecycle.Options{Config: cfg, Store: st, Logger: log, Background: bg})
	return &daemon{Reconciler: &Reconciler{Config: cfg, Store: st, Life: life, Log: log}, store: st, cancel: cancel}
}

// start closes the rig's store and runs what a daemon start-up runs over
// the state dir: the VM reconcile, then the orphan scan.
func (r *rig) start() *daemon {
	r.t.Helper()
	if err := r.st.Close(); err != nil {
		r.t.Fatal(err)
	}
	st, err := store.Open(r.cfg.DBPath(), 5*time.Second)
	if err != nil {
		r.t.Fatal(err)
	}
	d := newDaemon(r.cfg, st, slog.New(slog.NewTextHandler(r.log, &slog.HandlerOptions{Level: slog.LevelDebug})))
	r.t.Cleanup(d.close)
	for _, step := range []func(context.Context) error{d.VMs, d.Orphans} {
		if err := step(context.Background()); err != nil {
			r.t.Fatalf("start-up recovery: %v\n%s", err, r.log.String())
		}
	}
	return d
}

func (r *rig) get(d *daemon, id string) model.VM {
	r.t.Helper()
	vm, err := d.store.GetVM(id)
	if err != nil {
		r.t.Fatalf("GetVM %s: %v", id, err)
	}
	return vm
}

// TestRecoveryRuntimeCorruptHandles: whatever handles.json holds, recovery
// uses the store's VM.Runtime unless handles.json agrees with it, and
// ownRuntime drops every resource that cannot be the VM's (lo, eth0, a
// foreign loop, a foreign dm device, another VM's runtime dir, pid 1).
func TestRecoveryRuntimeCorruptHandles(t *testing.T) {
	d := newDaemon(config.Config{StateDir: "/var/lib/banger-test", RuntimeDir: "/run/banger-test"}, nil, slog.Default())
	id := "0123456789abcdef01234567"
	rtDir := d.vmRuntimeDir(id)
	store := model.Runtime{Phase: "running", RuntimeDir: rtDir,
		Monitor: vmm.Handle{PID: 4242, PIDStart: 99, BootID: "b", Cmdline: []string{"firecracker", "--api-sock", rtDir + "/fc.sock"},
			APISocket: rtDir + "/fc.sock", AgentSocket: rtDir + "/agent.sock"},
		Tap:  netctl.TapRefFor(id),
		Disk: blockdev.Disk{COWPath: d.vmDir(id) + "/disk.ext4", Path: d.vmDir(id) + "/disk.ext4"}}
	full := handlesJSON(t, id, store)
	with := func(fn func(*model.Runtime)) []byte {
		rt := store
		fn(&rt)
		return handlesJSON(t, id, rt)
	}
	cases := []struct {
		name       string
		raw        []byte // nil: no file
		wantSource string
	}{
		{"missing", nil, "store (handles.json is missing)"},
		{"empty", []byte{}, "store (handles.json is empty)"},
		{"truncated", full[:len(full)/2], "store (handles.json is truncated or not JSON"},
		{"garbage", []byte("\x00\xffnot json at all{"), "store (handles.json is truncated or not JSON"},
		{"another VM's", handlesJSON(t, "ffffffffffffffffffffffff", store), `store (handles.json was written for VM "ffffffffffffffffffffffff")`},
		{"naming lo", with(func(rt *model.Runtime) { rt.Tap.Name, rt.Tap.Alias = "lo", "" }), "store (handles.json disagrees with it)"},
		{"naming eth0", with(func(rt *model.Runtime) { rt.Tap.Name = "eth0" }), "store (handles.json disagrees with it)"},
		{"foreign loop", with(func(rt *model.Runtime) {
			rt.Disk.Loops = []model.LoopDev{{Device: "/dev/loop7", BackingFile: "/home/someone/disk.img"}}
		}), "store (handles.json disagrees with it)"},
		{"foreign dm", with(func(rt *model.Runtime) { rt.Disk.DMName, rt.Disk.DMUUID = "cryptroot", "CRYPT-LUKS2-abc" }), "store (handles.json disagrees with it)"},
		{"reused pid", with(func(rt *model.Runtime) { rt.Monitor.PID, rt.Monitor.PIDStart = 1, 1 }), "store (handles.json disagrees with it)"},
		{"agrees", full, "handles.json"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			base := t.TempDir()
			d := newDaemon(config.Config{StateDir: filepath.Join(base, "state"), RuntimeDir: filepath.Join(base, "run")}, nil, slog.Default())
			rtDir := d.vmRuntimeDir(id)
			// Re-root the fixture under this test's dirs.
			fix := func(b []byte) []byte {
				return bytes.ReplaceAll(bytes.ReplaceAll(b, []byte("/run/banger-test"), []byte(d.Config.RuntimeDir)), []byte("/var/lib/banger-test"), []byte(d.Config.StateDir))
			}
			var want model.Runtime
			if err := json.Unmarshal(fix(mustJSON(t, store)), &want); err != nil {
				t.Fatal(err)
			}
			if c.raw != nil {
				if err := os.MkdirAll(rtDir, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(rtDir, "handles.json"), fix(c.raw), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			got, source := d.recoveryRuntime(model.VM{ID: id, Runtime: want})
			if !strings.HasPrefix(source, c.wantSource) {
				t.Errorf("recoveryRuntime source = %q, want prefix %q", source, c.wantSource)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("recoveryRuntime runtime (-want +got):\n%s", diff)
			}
			own, refused := d.ownRuntime(id, got)
			if len(refused) != 0 || !own.SameIdentity(want) {
				t.Errorf("ownRuntime(store runtime) refused %v; it is all the VM's own", refused)
			}
		})
	}
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOwnRuntimeRefusesForeign: with no store record to trust, a runtime
// naming something that is not the VM's keeps only the VM's own resources.
func TestOwnRuntimeRefusesForeign(t *testing.T) {
	d := newDaemon(config.Config{StateDir: "/var/lib/banger", RuntimeDir: "/run/banger"}, nil, slog.Default())
	id, other := "aaaaaaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbbbbbb"
	rtDir, vmDir := d.vmRuntimeDir(id), d.vmDir(id)
	dm, uuid := "banger-"+id, "BANGER-"+id
	good := model.Runtime{RuntimeDir: rtDir,
		Monitor: vmm.Handle{PID: 4242, Cmdline: []string{"qemu-system-x86_64", "-chardev", "socket,id=qmp,path=" + rtDir + "/qmp.sock"},
			APISocket: rtDir + "/qmp.sock", AgentSocket: rtDir + "/agent.sock"},
		Tap: netctl.TapRefFor(id),
		Disk: blockdev.Disk{
			Loops:  []model.LoopDev{{Device: "/dev/loop3", BackingFile: vmDir + "/base.ext4.link", ReadOnly: true}, {Device: "/dev/loop4", BackingFile: vmDir + "/cow.img"}},
			DMName: dm, DMUUID: uuid, COWPath: vmDir + "/cow.img", BaseLink: vmDir + "/base.ext4.link", Path: "/dev/mapper/" + dm}}
	cases := []struct {
		name    string
		mutate  func(*model.Runtime)
		check   func(model.Runtime) bool
		refused string
	}{
		{"tap lo", func(rt *model.Runtime) { rt.Tap.Name, rt.Tap.Alias = "lo", "" }, func(rt model.Runtime) bool { return rt.Tap.Name == "" }, `tap "lo"`},
		{"tap eth0", func(rt *model.Runtime) { rt.Tap.Name = "eth0" }, func(rt model.Runtime) bool { return rt.Tap.Name == "" }, `tap "eth0"`},
		{"another VM's tap", func(rt *model.Runtime) { rt.Tap.Name, rt.Tap.Alias = netctl.TapName(other), netctl.TapAlias(other) }, func(rt model.Runtime) bool { return rt.Tap.Name == "" }, "tap"},
		{"right tap, foreign alias", func(rt *model.Runtime) { rt.Tap.Alias = "banger:" + other }, func(rt model.Runtime) bool { return rt.Tap.Name == "" }, "tap"},
		{"foreign loop", func(rt *model.Runtime) {
			rt.Disk.Loops = append(rt.Disk.Loops, model.LoopDev{Device: "/dev/loop0", BackingFile: "/home/u/disk.img"})
		}, func(rt model.Runtime) bool { return len(rt.Disk.Loops) == 2 }, "loop /dev/loop0"},
		{"loop of the state dir, another VM", func(rt *model.Runtime) {
			rt.Disk.Loops = []model.LoopDev{{Device: "/dev/loop9", BackingFile: d.vmDir(other) + "/cow.img"}}
		}, func(rt model.Runtime) bool { return len(rt.Disk.Loops) == 0 }, "loop /dev/loop9"},
		{"loop escaping by ..", func(rt *model.Runtime) {
			rt.Disk.Loops = []model.LoopDev{{Device: "/dev/loop9", BackingFile: vmDir + "/../../../../etc/passwd"}}
		}, func(rt model.Runtime) bool { return len(rt.Disk.Loops) == 0 }, "loop /dev/loop9"},
		{"not a loop device", func(rt *model.Runtime) {
			rt.Disk.Loops = []model.LoopDev{{Device: "/dev/sda", BackingFile: vmDir + "/cow.img"}}
		}, func(rt model.Runtime) bool { return len(rt.Disk.Loops) == 0 }, "loop /dev/sda"},
		{"foreign dm", func(rt *model.Runtime) { rt.Disk.DMName, rt.Disk.DMUUID = "cryptroot", "CRYPT-LUKS2-abc" }, func(rt model.Runtime) bool { return rt.Disk.DMName == "" && rt.Disk.DMUUID == "" }, `dm "cryptroot"`},
		{"our dm name, foreign uuid", func(rt *model.Runtime) { rt.Disk.DMUUID = "LVM-xyz" }, func(rt model.Runtime) bool { return rt.Disk.DMName == "" }, "dm"},
		{"another VM's runtime dir", func(rt *model.Runtime) { rt.RuntimeDir = d.vmRuntimeDir(other) }, func(rt model.Runtime) bool { return rt.RuntimeDir == "" }, "runtime dir"},
		{"socket outside", func(rt *model.Runtime) { rt.Monitor.APISocket = "/run/systemd/private" }, func(rt model.Runtime) bool { return rt.Monitor.APISocket == "" }, "socket"},
		{"cow outside", func(rt *model.Runtime) { rt.Disk.COWPath = "/etc/shadow" }, func(rt model.Runtime) bool { return rt.Disk.COWPath == "" }, "disk file /etc/shadow"},
		{"pid 1", func(rt *model.Runtime) { rt.Monitor.PID, rt.Monitor.Cmdline = 1, []string{"/sbin/init"} }, func(rt model.Runtime) bool { return rt.Monitor.PID == 0 }, "pid 1"},
		{"pid of another program", func(rt *model.Runtime) { rt.Monitor.Cmdline = []string{"sshd", "-D"} }, func(rt model.Runtime) bool { return rt.Monitor.PID == 0 }, "pid 4242"},
	}
	if own, refused := d.ownRuntime(id, good); len(refused) != 0 || !own.SameIdentity(good) {
		t.Fatalf("ownRuntime(good) refused %v", refused)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rt := good
			rt.Disk.Loops = append([]model.LoopDev(nil), good.Disk.Loops...)
			c.mutate(&rt)
			own, refused := d.ownRuntime(id, rt)
			if !c.check(own) {
				t.Errorf("ownRuntime kept the foreign resource: %+v", own)
			}
			if len(refused) != 1 || !strings.Contains(refused[0], c.refused) {
				t.Errorf("refused = %q, want one entry containing %q", refused, c.refused)
			}
			// Everything else stays.
			if c.name != "pid 1" && c.name != "pid of another program" && own.Monitor.PID != good.Monitor.PID {
				t.Errorf("the VM's own monitor was dropped")
			}
		})
	}
}

// TestReconcileAtStartup: one daemon start-up over a state dir holding
// every kind of leftover. Live monitors are re-adopted (whatever
// handles.json holds), dead ones cleaned up, a start that died before
// recording its pid has its monitor killed, interrupted creates and deletes
// are finished, a handles.json naming foreign resources is refused without
// failing the cleanup, orphans are removed.
func TestReconcileAtStartup(t *testing.T) {
	r := newRig(t)
	id := func() string { return model.NewID() }

	liveID := id()
	live := r.vmWithID(liveID, "live", model.VMRunning, r.monitor(liveID), true)
	r.handles(live.ID, handlesJSON(t, live.ID, live.Runtime))

	noHandlesID := id()
	noHandles := r.vmWithID(noHandlesID, "live-no-handles", model.VMRunning, r.monitor(noHandlesID), true)

	garbageID := id()
	garbage := r.vmWithID(garbageID, "live-garbage-handles", model.VMRunning, r.monitor(garbageID), true)
	r.handles(garbage.ID, []byte("{\"vm_id\": \"trunc"))

	startingID := id()
	starting := r.vmWithID(startingID, "starting", model.VMStarting, r.monitor(startingID), true)
	r.handles(starting.ID, handlesJSON(t, starting.ID, starting.Runtime))

	deadID := id()
	dead := r.vmWithID(deadID, "dead", model.VMRunning, r.deadMonitor(deadID), true)
	r.handles(dead.ID, handlesJSON(t, "ffffffffffffffffffffffff", dead.Runtime)) // another VM's file

	// A start that died after the monitor started, before its pid was
	// recorded: the record says vmm:starting, the process runs.
	strayID := id()
	strayRT := r.monitor(strayID)
	stray := r.vmWithID(strayID, "stray", model.VMStarting, model.Runtime{Phase: "vmm:starting", RuntimeDir: r.rtDir(strayID)}, true)

	// handles.json naming lo and a foreign dm device while the store holds
	// nothing: refused; the cleanup succeeds without touching them.
	foreignID := id()
	foreign := r.vmWithID(foreignID, "foreign", model.VMRunning, model.Runtime{}, true)
	r.handles(foreign.ID, handlesJSON(t, foreign.ID, model.Runtime{Tap: netctl.TapRef{Name: "lo"}, Disk: blockdev.Disk{DMName: "cryptroot", DMUUID: "CRYPT-x",
		Loops: []model.LoopDev{{Device: "/dev/loop0", BackingFile: "/home/u/disk.img"}}}, RuntimeDir: r.rtDir(foreignID)}))

	// An interrupted create (record and lease, half a disk) and an
	// interrupted delete.
	creating := r.vm("creating", model.VMCreated, model.Runtime{Phase: "disk:creating", Disk: blockdev.Disk{COWPath: filepath.Join(r.vmDir("x"), "y")}}, true)
	if err := os.MkdirAll(r.vmDir(creating.ID), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := r.st.UpdateVM(creating.ID, func(v *model.VM) error {
		v.Runtime.Disk.COWPath = filepath.Join(r.vmDir(v.ID), "disk.ext4")
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(r.vmDir(creating.ID), "disk.ext4.partial"), []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	deleting := r.vm("deleting", model.VMStopped, model.Runtime{Phase: lifecycle.PhaseDeleting}, true)
	if err := os.MkdirAll(r.vmDir(deleting.ID), 0o700); err != nil {
		t.Fatal(err)
	}
	// A stopped VM keeps its disk; a half-copied one and the old disk a
	// restore replaced are removed.
	stopped := r.vm("stopped", model.VMStopped, model.Runtime{}, true)
	if err := os.MkdirAll(r.vmDir(stopped.ID), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"disk.ext4", "disk.ext4.partial", "disk.ext4" + blockdev.ReplacedSuffix} {
		if err := os.WriteFile(filepath.Join(r.vmDir(stopped.ID), f), []byte("disk"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// A restore that died between its renames: the old disk comes back.
	restoring := r.vm("restoring", model.VMStopped, model.Runtime{}, true)
	if err := os.MkdirAll(r.vmDir(restoring.ID), 0o700); err != nil {
		t.Fatal(err)
	}
	for f, content := range map[string]string{"disk.ext4" + blockdev.ReplacedSuffix: "old disk", "disk.ext4" + blockdev.UnflushedSuffix: "another-boot\n"} {
		if err := os.WriteFile(filepath.Join(r.vmDir(restoring.ID), f), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Orphans: a runtime dir and a monitor of a VM no record knows, a VM dir.
	orphanID := id()
	orphanRT := r.monitor(orphanID)
	if err := os.MkdirAll(r.vmDir("deadbeefdeadbeefdeadbeef"), 0o700); err != nil {
		t.Fatal(err)
	}

	d := r.start()
	logs := r.log.String()

	for _, vm := range []model.VM{live, noHandles, garbage} {
		got := r.get(d, vm.ID)
		if got.State != model.VMRunning || got.Recovery.ReadoptedAt.IsZero() || got.Runtime.Monitor.PID != vm.Runtime.Monitor.PID {
			t.Errorf("%s: state %s readopted %v pid %d, want running, re-adopted, pid %d", vm.Name, got.State, got.Recovery.ReadoptedAt, got.Runtime.Monitor.PID, vm.Runtime.Monitor.PID)
		}
		if alive, _ := vmm.Alive(vm.Runtime.Monitor); !alive {
			t.Errorf("%s: the re-adopted monitor pid %d is gone", vm.Name, vm.Runtime.Monitor.PID)
		}
		if _, err := d.loadHandles(vm.ID); err != nil {
			t.Errorf("%s: handles.json not rewritten after re-adoption: %v", vm.Name, err)
		}
	}
	// The starting VM resumed its boot waiter: the fake answers no agent,
	// so it stays starting, with a waiter.
	if got := r.get(d, starting.ID); got.State != model.VMStarting || got.Recovery.ReadoptedAt.IsZero() {
		t.Errorf("starting: state %s readopted %v, want starting and re-adopted", got.State, got.Recovery.ReadoptedAt)
	}
	if l := d.Life.Supervisor(starting.ID); l == nil {
		t.Errorf("starting: no boot waiter after re-adoption")
	}
	for _, vm := range []model.VM{dead, stray, foreign} {
		got := r.get(d, vm.ID)
		if got.State != model.VMStopped || !got.Runtime.Empty() || got.Recovery.CleanedAt.IsZero() {
			t.Errorf("%s: state %s (%s) runtime %+v cleaned %v, want stopped, empty runtime, cleaned", vm.Name, got.State, got.Reason, got.Runtime, got.Recovery.CleanedAt)
		}
		if _, err := os.Stat(r.rtDir(vm.ID)); !os.IsNotExist(err) {
			t.Errorf("%s: runtime dir left (%v)", vm.Name, err)
		}
	}
	if alive, _ := vmm.Alive(strayRT.Monitor); alive {
		t.Errorf("stray monitor pid %d of the interrupted start still runs", strayRT.Monitor.PID)
	}
	if got := r.get(d, stray.ID); len(got.Recovery.Removed) != 1 || !strings.Contains(got.Recovery.Removed[0], fmt.Sprintf("stray monitor pid %d", strayRT.Monitor.PID)) {
		t.Errorf("stray: Recovery.Removed = %q, want the stray monitor", got.Recovery.Removed)
	}
	if alive, _ := vmm.Alive(orphanRT.Monitor); alive {
		t.Errorf("orphan monitor pid %d still runs", orphanRT.Monitor.PID)
	}
	for _, vm := range []model.VM{creating, deleting} {
		if _, err := d.store.GetVM(vm.ID); err == nil {
			t.Errorf("%s: record left after start-up", vm.Name)
		}
		if _, err := os.Stat(r.vmDir(vm.ID)); !os.IsNotExist(err) {
			t.Errorf("%s: VM dir left (%v)", vm.Name, err)
		}
	}
	leases, err := d.store.Leases()
	if err != nil {
		t.Fatal(err)
	}
	for _, vm := range []model.VM{creating, deleting} {
		for ip, owner := range leases {
			if owner == vm.ID {
				t.Errorf("%s: lease %s left", vm.Name, ip)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(r.vmDir(stopped.ID), "disk.ext4")); err != nil {
		t.Errorf("stopped VM lost its disk: %v", err)
	}
	if _, err := os.Stat(filepath.Join(r.vmDir(stopped.ID), "disk.ext4.partial")); !os.IsNotExist(err) {
		t.Errorf("half-copied disk left (%v)", err)
	}
	if _, err := os.Stat(filepath.Join(r.vmDir(stopped.ID), "disk.ext4"+blockdev.ReplacedSuffix)); !os.IsNotExist(err) {
		t.Errorf("replaced old disk left (%v)", err)
	}
	if b, err := os.ReadFile(filepath.Join(r.vmDir(restoring.ID), "disk.ext4")); err != nil || string(b) != "old disk" {
		t.Errorf("the disk of an interrupted restore was not put back: %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(r.vmDir(restoring.ID), "disk.ext4"+blockdev.UnflushedSuffix)); !os.IsNotExist(err) {
		t.Errorf("the marker of the copy that never took the name is left (%v)", err)
	}
	for _, p := range []string{r.rtDir(orphanID), r.vmDir("deadbeefdeadbeefdeadbeef")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("orphan %s left (%v)", p, err)
		}
	}
	for _, want := range []string{
		`refused="tap \"lo\"`, `refused="dm \"cryptroot\"`, `refused="loop /dev/loop0 backed by \"/home/u/disk.img\""`,
		"removed the VM of an interrupted create", "finished the interrupted delete",
		"removed orphan VM monitor", "removed orphan runtime dir", "removed orphan VM dir",
		"removed half-copied disk", "reconciled VMs",
		`handles.json was written for VM \"ffffffffffffffffffffffff\"`, "handles.json is truncated or not JSON", "handles.json is missing",
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("daemon log lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("daemon log:\n%s", logs)
	}
	if err := d.store.Check(); err != nil {
		t.Errorf("store inconsistent after reconcile: %v", err)
	}
}

// TestReconcileAfterReboot: with another boot id (BANGER_TEST_BOOT_ID's
// override), every VM is stopped and its runtime state cleared, live
// monitor or not.
func TestReconcileAfterReboot(t *testing.T) {
	r := newRig(t)
	var vms []model.VM
	for i := range 3 {
		id := model.NewID()
		vm := r.vmWithID(id, fmt.Sprintf("vm%d", i), model.VMRunning, r.monitor(id), true)
		r.handles(id, handlesJSON(t, id, vm.Runtime))
		vms = append(vms, vm)
	}
	rebooted := "00000000-0000-4000-8000-000000000000"
	old := bootIDOverride.Swap(&rebooted)
	t.Cleanup(func() { bootIDOverride.Store(old) })
	d := r.start()
	for _, vm := range vms {
		got := r.get(d, vm.ID)
		if got.State != model.VMStopped || !got.Runtime.Empty() || !got.Recovery.ReadoptedAt.IsZero() {
			t.Errorf("%s after reboot: state %s runtime %+v readopted %v, want stopped and cleared", vm.Name, got.State, got.Runtime, got.Recovery.ReadoptedAt)
		}
		if _, err := os.Stat(r.rtDir(vm.ID)); !os.IsNotExist(err) {
			t.Errorf("%s: stale runtime dir left (%v)", vm.Name, err)
		}
		if alive, _ := vmm.Alive(vm.Runtime.Monitor); alive {
			t.Errorf("%s: monitor pid %d still runs", vm.Name, vm.Runtime.Monitor.PID)
		}
	}
	if n := strings.Count(r.log.String(), "VM stopped at start-up: the host rebooted"); n != len(vms) {
		t.Errorf("%d \"host rebooted\" log lines, want %d:\n%s", n, len(vms), r.log.String())
	}
}

// BenchmarkReconcile50 measures start-up reconcile over 50 VM records: 25
// whose fake Firecracker runs (re-adopted: identity check and an API call
// each) and 25 whose monitor is gone (cleaned up). Goal: under 1 s.
//
//	go test -run '^$' -bench Reconcile50 -benchtime 5x ./internal/reconciler/
func BenchmarkReconcile50(b *testing.B) {
	r := newRig(b)
	type rec struct {
		id string
		rt model.Runtime
	}
	var recs []rec
	for i := range 50 {
		id := model.NewID()
		var rt model.Runtime
		if i%2 == 0 {
			rt = r.monitor(id)
		} else {
			rt = r.deadMonitor(id)
		}
		r.vmWithID(id, fmt.Sprintf("vm%02d", i), model.VMRunning, rt, true)
		recs = append(recs, rec{id: id, rt: rt})
	}
	d := r.start()
	ctx := context.Background()
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		for _, rc := range recs {
			if _, err := d.store.UpdateVM(rc.id, func(v *model.VM) error {
				v.State, v.Runtime, v.Recovery = model.VMRunning, rc.rt, model.Recovery{}
				return nil
			}); err != nil {
				b.Fatal(err)
			}
			if err := d.writeHandles(model.VM{ID: rc.id, Runtime: rc.rt}); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		if err := d.VMs(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	vms, _ := d.store.ListVMs(nil)
	var running int
	for _, vm := range vms {
		if vm.State == model.VMRunning {
			running++
		}
	}
	if running != 25 {
		b.Fatalf("%d VMs running after reconcile, want 25", running)
	}
}

// TestReconcileUnflushedDisks: a disk restored from a snapshot and written
// without a flush (marked <disk>.unflushed) is flushed and kept at
// start-up when the marker is this boot's (the daemon died, the host did
// not), and removed, with the VM saying why, when it is another boot's
// (the host went down before the flush).
func TestReconcileUnflushedDisks(t *testing.T) {
	r := newRig(t)
	boot := currentBootID()
	if boot == "" {
		// banger itself needs it (every handle records it): not a tier to skip.
		t.Fatal("no boot id on this host (/proc/sys/kernel/random/boot_id)")
	}
	mk := func(name, markerBoot string) (model.VM, string) {
		vm := r.vm(name, model.VMStopped, model.Runtime{}, true)
		disk := filepath.Join(r.vmDir(vm.ID), blockdev.DiskFileName)
		if err := os.MkdirAll(filepath.Dir(disk), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(disk, []byte("restored"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(disk+blockdev.UnflushedSuffix, []byte(markerBoot+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return vm, disk
	}
	same, sameDisk := mk("same-boot", boot)
	other, otherDisk := mk("other-boot", "00000000-0000-4000-8000-00000000f1a5")
	d := r.start()
	if _, err := os.Stat(sameDisk); err != nil {
		t.Errorf("the disk marked in this boot is gone after start-up: %v", err)
	}
	if _, err := os.Stat(otherDisk); !os.IsNotExist(err) {
		t.Errorf("the disk marked in another boot is still there (%v); want it removed", err)
	}
	for _, p := range []string{sameDisk, otherDisk} {
		if _, err := os.Stat(p + blockdev.UnflushedSuffix); !os.IsNotExist(err) {
			t.Errorf("marker %s left after start-up (%v)", p+blockdev.UnflushedSuffix, err)
		}
	}
	if got := r.get(d, same.ID); got.Reason != "" {
		t.Errorf("%s: reason %q, want none", same.Name, got.Reason)
	}
	if got := r.get(d, other.ID); !strings.Contains(got.Reason, "host went down before the disk restored from a snapshot was flushed") {
		t.Errorf("%s: reason %q, want it to say the disk was lost with the host", other.Name, got.Reason)
	}
}
