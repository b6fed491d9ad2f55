// Package restart holds the end-to-end tests of restart safety on the fake
// Firecracker: a daemon restarted (or killed) under running VMs re-adopts
// or cleans each of them from its records, with untrustworthy handles.json
// files and with fifty records. The real QEMU case is in test/e2e/adoption.
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
		got := e2etest.Inspect(ctx, t, d, v)
		vms[v] = model.VM{ID: got.ID, Runtime: *got.Runtime}
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
			m.Runtime.Disk.Loops = []model.LoopDev{{Device: dev, BackingFile: file}}
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
		if err := json.Unmarshal(good, &h); err != nil || h.VMID != vm.ID || h.Runtime.Tap.Name == "" || h.Runtime.Monitor.PID == 0 {
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
			raw = withRT(func(rt *model.Runtime) { rt.Tap.Name, rt.Tap.Alias = "lo", "" })
		case "eth0":
			raw = withRT(func(rt *model.Runtime) { rt.Tap.Name = "eth0" })
		case "foreign-loop":
			raw = withRT(func(rt *model.Runtime) {
				rt.Disk.Loops = []model.LoopDev{{Device: foreignLoop, BackingFile: foreignFile}}
			})
		case "foreign-dm":
			raw = withRT(func(rt *model.Runtime) { rt.Disk.DMName, rt.Disk.DMUUID = "cryptroot", "CRYPT-LUKS2-0123" })
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
			for _, want := range []string{"tap " + vms[v].Runtime.Tap.Name, "loop " + ownLoops[v]} {
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
	if got.State != model.VMRunning || got.Recovery.ReadoptedAt.IsZero() || got.Runtime.Monitor.PID != live.Runtime.Monitor.PID {
		t.Errorf("live-garbage: state %s readopted %v pid %d, want running, re-adopted, pid %d", got.State, got.Recovery.ReadoptedAt, got.Runtime.Monitor.PID, live.Runtime.Monitor.PID)
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
				pids = append(pids, e2etest.Inspect(ctx, t, d, name).Runtime.Monitor.PID)
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
