// Package restart holds the end-to-end tests of restart safety: a daemon
// restarted (or killed) under running VMs re-adopts or cleans each of them
// from its records, with untrustworthy handles.json files, fifty records,
// and a real QEMU guest.
package restart

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// losetup binds a loop device to file and detaches it when the test ends.
func losetup(t *testing.T, file string) string {
	t.Helper()
	testutil.RequiresLoop(t)
	if err := os.WriteFile(file, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := e2etest.CombinedOutput(exec.Command("losetup", "-f", "--show", file))
	if err != nil {
		t.Fatalf("losetup %s: %v: %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	return dev
}

func loopBacking(dev string) string {
	b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/loop/backing_file")
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
}

// TestE2ECorruptHandles: VMs whose monitor died while the daemon was down,
// each with a handles.json that cannot be trusted: missing, empty,
// truncated, garbage, another VM's, naming lo, eth0, a foreign loop or a
// foreign dm device. Start-up cleanup falls back to VM.Runtime, removes
// exactly banger's resources (the VM's tap, a loop on a file in the VM's
// dir recorded in VM.Runtime) and never the foreign ones, which the test
// made: lo, a veth named eth0, a loop on a file outside the state dir.
// A live VM with a garbage handles.json is re-adopted from the store.
func TestE2ECorruptHandles(t *testing.T) {
	e := e2etest.FakeEnv(t, nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// Foreign resources.
	e.NS.MustRun(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer")
	e.NS.MustRun(t, "ip", "link", "set", "eth0", "up")
	foreignFile := filepath.Join(t.TempDir(), "foreign.img")
	foreignLoop := losetup(t, foreignFile)

	variants := []string{"missing", "empty", "truncated", "garbage", "other-vm", "lo", "eth0", "foreign-loop", "foreign-dm", "lo-store-empty"}
	vms := map[string]model.VM{}
	for _, v := range append(variants, "live-garbage") {
		d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", v, "--memory", "256M", "--cpus", "1")
		d.MustCLI(ctx, "vm", "start", v, "--wait")
		vms[v] = e2etest.Inspect(ctx, t, d, v)
	}
	d.Kill()

	// Banger's own loop for each VM: a file in the VM's dir, recorded in
	// VM.Runtime as dm-snapshot records its loops.
	st, err := store.Open(filepath.Join(d.StateDir(), "banger.db"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ownLoops := map[string]string{}
	for _, v := range variants {
		vm := vms[v]
		file := filepath.Join(d.StateDir(), "vms", vm.ID, "cow.img")
		dev := losetup(t, file)
		ownLoops[v] = dev
		vm, err = st.UpdateVM(vm.ID, func(m *model.VM) error {
			m.Runtime.Loops = []model.LoopDev{{Device: dev, BackingFile: file}}
			if v == "lo-store-empty" {
				m.Runtime = model.Runtime{}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		vms[v] = vm
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	other := vms["eth0"].ID
	h0 := map[string]int{}
	for _, v := range variants {
		h0[v] = inspectPID(t, d, vms[v].ID)
		if h0[v] == 0 {
			t.Fatalf("%s: no monitor process found", v)
		}
	}
	for _, v := range variants {
		vm := vms[v]
		// The monitor dies while the daemon is down.
		_ = syscall.Kill(h0[v], syscall.SIGKILL)
		path := filepath.Join(d.RuntimeDir(), "vms", vm.ID, "handles.json")
		good, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%s: handles.json after start: %v", v, err)
		}
		var h struct {
			VMID    string        `json:"vm_id"`
			Runtime model.Runtime `json:"runtime"`
		}
		if err := json.Unmarshal(good, &h); err != nil || h.VMID != vm.ID || h.Runtime.Tap == "" || h.Runtime.PID == 0 {
			t.Fatalf("%s: handles.json written at start is not the VM's runtime: %v\n%s", v, err, good)
		}
		withRT := func(fn func(*model.Runtime)) []byte {
			rt := h.Runtime
			fn(&rt)
			b, _ := json.Marshal(map[string]any{"vm_id": vm.ID, "runtime": rt})
			return b
		}
		var raw []byte
		switch v {
		case "missing":
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			continue
		case "empty":
			raw = nil
		case "truncated":
			raw = good[:len(good)/2]
		case "garbage":
			raw = []byte("\x00\x01 this is not json {{{")
		case "other-vm":
			raw = []byte(strings.ReplaceAll(string(good), vm.ID, other))
		case "lo", "lo-store-empty":
			raw = withRT(func(rt *model.Runtime) { rt.Tap, rt.TapAlias = "lo", "" })
		case "eth0":
			raw = withRT(func(rt *model.Runtime) { rt.Tap = "eth0" })
		case "foreign-loop":
			raw = withRT(func(rt *model.Runtime) {
				rt.Loops = []model.LoopDev{{Device: foreignLoop, BackingFile: foreignFile}}
			})
		case "foreign-dm":
			raw = withRT(func(rt *model.Runtime) { rt.DMName, rt.DMUUID = "cryptroot", "CRYPT-LUKS2-0123" })
		}
		if err := os.WriteFile(path, raw, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	live := vms["live-garbage"]
	if err := os.WriteFile(filepath.Join(d.RuntimeDir(), "vms", live.ID, "handles.json"), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}

	d.Start()
	logs := d.Log()
	for _, v := range variants {
		vm := e2etest.Inspect(ctx, t, d, v)
		if vm.State != model.VMStopped || !vm.Runtime.Empty() {
			t.Errorf("%s: state %s (%s) runtime %+v, want stopped with no runtime", v, vm.State, vm.Reason, vm.Runtime)
		}
		removed := strings.Join(vm.Recovery.Removed, ", ")
		if v != "lo-store-empty" {
			// The cleanup itself (not the orphan scan) removed banger's tap
			// and loop, found through VM.Runtime.
			for _, want := range []string{"tap " + vms[v].Runtime.Tap, "loop " + ownLoops[v]} {
				if !strings.Contains(removed, want) {
					t.Errorf("%s: last cleanup removed %q, want %q in it", v, removed, want)
				}
			}
			if !regexp.MustCompile(`vm=` + v + ` id=\S+ source="store \(`).MatchString(logs) {
				t.Errorf("%s: no log line saying the store's VM.Runtime was used", v)
			}
		}
		if b := loopBacking(ownLoops[v]); b != "" {
			t.Errorf("%s: banger's loop %s still bound to %s", v, ownLoops[v], b)
		}
		text := d.MustCLI(ctx, "vm", "inspect", v)
		if !strings.Contains(text, "last cleanup") {
			t.Errorf("%s: banger vm inspect shows no last cleanup:\n%s", v, text)
		}
	}
	// The foreign resources survive.
	if b := loopBacking(foreignLoop); b != foreignFile {
		t.Errorf("foreign loop %s is bound to %q, want %q: cleanup touched it", foreignLoop, b, foreignFile)
	}
	links := e.NS.MustRun(t, "ip", "-o", "link", "show")
	for _, want := range []string{": lo:", ": eth0@", ": eth0-peer@"} {
		if !strings.Contains(links, want) {
			t.Errorf("foreign link %q is gone:\n%s", want, links)
		}
	}
	if !strings.Contains(e.NS.MustRun(t, "ip", "-o", "link", "show", "lo"), "UP") {
		t.Errorf("lo is no longer up")
	}
	if !strings.Contains(logs, `refused="tap \"lo\"`) {
		t.Errorf("no log line refusing lo from handles.json")
	}
	// The live VM is re-adopted from the store, its handles.json rewritten.
	got := e2etest.Inspect(ctx, t, d, "live-garbage")
	if got.State != model.VMRunning || got.Recovery.ReadoptedAt.IsZero() || got.Runtime.PID != live.Runtime.PID {
		t.Errorf("live-garbage: state %s readopted %v pid %d, want running, re-adopted, pid %d", got.State, got.Recovery.ReadoptedAt, got.Runtime.PID, live.Runtime.PID)
	}
	if text := d.MustCLI(ctx, "vm", "inspect", "live-garbage"); !strings.Contains(text, "re-adopted at") {
		t.Errorf("banger vm inspect shows no re-adoption:\n%s", text)
	}
	if raw, _ := os.ReadFile(filepath.Join(d.RuntimeDir(), "vms", live.ID, "handles.json")); !strings.Contains(string(raw), live.ID) {
		t.Errorf("handles.json of the re-adopted VM not rewritten: %q", raw)
	}
	d.MustCLI(ctx, "vm", "stop", "live-garbage")
	e2etest.WithStore(t, d, func(_ *store.Store, recs []model.VM) {
		for _, s := range e2etest.Leaks(t, e, recs) {
			t.Errorf("after start-up cleanup: %s", s)
		}
	})
}

// inspectPID finds the fake monitor of VM id by its command line (for a
// VM whose record no longer names it).
func inspectPID(t *testing.T, d *e2etest.Daemon, id string) int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		raw, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.Contains(string(raw), filepath.Join(d.RuntimeDir(), "vms", id)+"/") {
			return pid
		}
	}
	return 0
}

var reconciledRE = regexp.MustCompile(`msg="reconciled VMs" vms=(\d+) adopted=(\d+) cleaned=(\d+) removed=\d+ failed=(\d+) duration=(\S+)`)

// TestE2EReconcile50 measures start-up reconcile of a real daemon process
// over 50 VM records: 30 started, of which 15 lose their monitor while the
// daemon is down. The figure is the daemon's own "reconciled VMs" log line.
// Goal: under 1 s.
func TestE2EReconcile50(t *testing.T) {
	e := e2etest.FakeEnv(t, nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var pids []int
	for i := range 50 {
		name := fmt.Sprintf("r%02d", i)
		d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", name, "--memory", "256M", "--cpus", "1")
		if i < 30 {
			d.MustCLI(ctx, "vm", "start", name, "--wait")
			if i%2 == 0 {
				pids = append(pids, e2etest.Inspect(ctx, t, d, name).Runtime.PID)
			}
		}
	}
	d.Kill()
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	time.Sleep(200 * time.Millisecond)
	logBefore := len(d.Log())
	d.Start()
	m := reconciledRE.FindStringSubmatch(d.Log()[logBefore:])
	if m == nil {
		t.Fatalf("no \"reconciled VMs\" log line:\n%s", e2etest.Tail(d.Log()[logBefore:], 40))
	}
	dur, err := time.ParseDuration(m[5])
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("start-up reconcile of %s VM records (%s re-adopted, %s cleaned, %s failed): %s", m[1], m[2], m[3], m[4], dur)
	if m[1] != "50" || m[2] != "15" || m[3] != "15" || m[4] != "0" {
		t.Errorf("reconcile counts: vms %s adopted %s cleaned %s failed %s, want 50, 15, 15, 0", m[1], m[2], m[3], m[4])
	}
	if dur > time.Second {
		t.Errorf("reconcile took %s, goal under 1 s", dur)
	}
	e2etest.WithStore(t, d, func(_ *store.Store, recs []model.VM) {
		for _, s := range e2etest.Leaks(t, e, recs) {
			t.Error(s)
		}
	})
}

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
	h := vmm.Handle{PID: before.Runtime.PID, PIDStart: before.Runtime.PIDStart, BootID: before.Runtime.BootID, Cmdline: before.Runtime.Cmdline}
	if alive, _ := vmm.Alive(h); !alive {
		t.Fatalf("QEMU pid %d died with the daemon", h.PID)
	}
	d.Start()
	after := e2etest.Inspect(ctx, t, d, "keep")
	if after.State != model.VMRunning || after.Runtime.PID != before.Runtime.PID || after.Recovery.ReadoptedAt.IsZero() {
		t.Fatalf("after restart: state %s pid %d readopted %v, want running, pid %d, re-adopted", after.State, after.Runtime.PID, after.Recovery.ReadoptedAt, before.Runtime.PID)
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
	rh := vmm.Handle{PID: running.Runtime.PID, PIDStart: running.Runtime.PIDStart, BootID: running.Runtime.BootID, Cmdline: running.Runtime.Cmdline}
	if alive, _ := vmm.Alive(rh); alive {
		t.Errorf("QEMU pid %d still runs after the simulated reboot", rh.PID)
	}
	check("after a simulated reboot")
	d.MustCLI(ctx, "vm", "rm", "keep")
}
