package snapshot_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/snapshot"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fake"
)

// The test binary doubles as the fake Firecracker (no KVM here), and as a
// daemon that crashes at a failpoint (see TestCrashAtEachFailpoint).
func TestMain(m *testing.M) {
	switch {
	case os.Getenv(crashEnv) != "":
		os.Exit(crashChild())
	case os.Getenv("BANGER_FAKE_FIRECRACKER") == "1":
		os.Exit(fake.Main(os.Args[1:]))
	}
	os.Exit(m.Run())
}

func monitor(t *testing.T) *firecracker.Monitor {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("BANGER_FAKE_FIRECRACKER", "1")
	m := firecracker.New()
	m.Binary = self
	m.TermWait = 2 * time.Second
	return m
}

// vm is one VM run by the fake: its spec, handle and disk.
type vm struct {
	spec vmm.Spec
	h    vmm.Handle
}

func newSpec(t *testing.T, kernel string) vmm.Spec {
	t.Helper()
	dir := t.TempDir()
	return vmm.Spec{
		VMID: "01SNAP", Name: "snap", CPUs: 2, MemoryMiB: 64, Kernel: kernel, Cmdline: "console=ttyS0",
		Disk: filepath.Join(dir, "disk.img"), RuntimeDir: filepath.Join(dir, "run"), ConsoleLog: filepath.Join(dir, "console.log"),
	}
}

// startVM boots a fake VM whose disk holds some data and a hole.
func startVM(t *testing.T, m *firecracker.Monitor) vm {
	t.Helper()
	kernel := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(kernel, []byte("kernel"), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := newSpec(t, kernel)
	if err := os.WriteFile(spec.Disk, []byte("written before the pause\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(spec.Disk, 64<<20); err != nil {
		t.Fatal(err)
	}
	h, err := m.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })
	return vm{spec: spec, h: h}
}

func take(t *testing.T, st *snapshot.Store, m *firecracker.Monitor, v vm, name string) snapshot.Snapshot {
	t.Helper()
	snap, err := st.Take(context.Background(), params(m, v, name))
	if err != nil {
		t.Fatalf("Take(%q): %v", name, err)
	}
	return snap
}

func params(m *firecracker.Monitor, v vm, name string) snapshot.TakeParams {
	return snapshot.TakeParams{
		Name: name, Owner: 1000, Source: snapshot.Source{VMID: v.spec.VMID, VMName: v.spec.Name},
		Machine: snapshot.Machine{Monitor: firecracker.Name, Kernel: v.spec.Kernel, Cmdline: v.spec.Cmdline, CPUs: v.spec.CPUs, MemoryMiB: v.spec.MemoryMiB},
		Monitor: m, Handle: v.h, Disk: v.spec.Disk,
	}
}

func state(t *testing.T, h vmm.Handle) string {
	t.Helper()
	info, err := firecracker.NewClient(h.APISocket).DescribeInstance(context.Background())
	if err != nil {
		t.Fatalf("DescribeInstance: %v", err)
	}
	return info.State
}

func restoreParams(m *firecracker.Monitor, snap snapshot.Snapshot, spec vmm.Spec) snapshot.RestoreParams {
	return snapshot.RestoreParams{Snapshot: snap, MonitorName: firecracker.Name, Monitor: m, Spec: spec}
}

func TestTakeListRestoreRemove(t *testing.T) {
	m := monitor(t)
	v := startVM(t, m)
	st := snapshot.NewStore(filepath.Join(t.TempDir(), "snapshots"))
	var steps []string
	p := params(m, v, "first")
	p.Progress = func(s string) { steps = append(steps, s) }
	snap, err := st.Take(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("progress: %q", steps)
	// Take hashed every file: the first restore does not read them again.
	for _, f := range snap.Files {
		if !st.Verified(filepath.Join(st.Path(snap), f.Name), f.SHA256) {
			t.Errorf("%s is not taken as verified after Take hashed it", f.Name)
		}
	}
	if snap.Phase != snapshot.PhaseReady || snap.Pause <= 0 || snap.Machine.MonitorVersion == "" || snap.Machine.Accel != "kvm" || snap.Machine.CPUFeatures == "" {
		t.Errorf("snapshot record incomplete: %+v", snap)
	}
	roles := map[string]int{}
	for _, f := range snap.Files {
		roles[f.Role]++
		if len(f.SHA256) != 64 || f.Size <= 0 {
			t.Errorf("file %+v: want a size and a SHA-256", f)
		}
	}
	if roles[snapshot.RoleDisk] != 1 || roles[snapshot.RoleState] != 2 {
		t.Errorf("file roles %v, want one disk and the monitor's two state files", roles)
	}
	if got := state(t, v.h); got != "Running" {
		t.Errorf("VM state after the snapshot = %q, want Running", got)
	}
	// The disk copy holds what was written before the pause, and is sparse.
	disk := filepath.Join(st.Path(snap), snapshot.DiskFileName)
	b, err := os.ReadFile(disk) //nolint:gosec // test file
	if err != nil || !bytes.HasPrefix(b, []byte("written before the pause\n")) || len(b) != 64<<20 {
		t.Fatalf("disk copy: %v, %d bytes, starts %q", err, len(b), b[:min(len(b), 30)])
	}
	if snap.SizeOnDisk() >= snap.Size() {
		t.Errorf("size on disk %d >= apparent size %d: holes were filled", snap.SizeOnDisk(), snap.Size())
	}

	list, err := st.List()
	if err != nil || len(list) != 1 || list[0].ID != snap.ID {
		t.Fatalf("List = %+v, %v; want the one snapshot", list, err)
	}
	for _, ref := range []string{"first", snap.ID} {
		if got, err := st.Get(ref); err != nil || got.ID != snap.ID {
			t.Errorf("Get(%q) = %+v, %v", ref, got, err)
		}
	}
	if _, err := st.Get("nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Get(nope) = %v, want ErrNotFound", err)
	}

	// Restore into a new VM (another disk, runtime dir and socket).
	spec := newSpec(t, v.spec.Kernel)
	h, err := st.Restore(context.Background(), restoreParams(m, snap, spec))
	if err != nil {
		t.Fatalf("Restore: %v", err)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })
	if got := state(t, h); got != "Running" {
		t.Errorf("restored VM state = %q, want Running", got)
	}
	if b, err := os.ReadFile(spec.Disk); err != nil || !bytes.HasPrefix(b, []byte("written before the pause\n")) { //nolint:gosec // test file
		t.Errorf("restored disk: %v, starts %q", err, b[:min(len(b), 30)])
	}
	if b, _ := os.ReadFile(spec.ConsoleLog); !bytes.Contains(b, []byte(fake.RestoredLine)) {
		t.Errorf("restored console = %q, want %q", b, fake.RestoredLine)
	}

	// A file changed after a successful restore is hashed again (Verify
	// remembers only files unchanged since they verified) and refused.
	f, err := os.OpenFile(disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("X"), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := st.Verify(context.Background(), snap); !errors.Is(err, snapshot.ErrCorrupt) {
		t.Errorf("Verify after the disk copy changed = %v, want ErrCorrupt", err)
	}

	// rm refuses while a VM depends on the files, unless forced.
	inUse := func(snapshot.Snapshot) []string { return []string{"clone-1"} }
	if _, err := st.Remove("first", false, inUse); !errors.Is(err, snapshot.ErrInUse) || !strings.Contains(err.Error(), "clone-1") {
		t.Errorf("Remove while in use = %v, want ErrInUse naming clone-1", err)
	}
	if _, err := st.Remove("first", true, inUse); err != nil {
		t.Fatalf("Remove --force: %v", err)
	}
	if _, err := os.Stat(st.Path(snap)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("snapshot dir after Remove: %v", err)
	}
	if list, _ := st.List(); len(list) != 0 {
		t.Errorf("List after Remove = %+v", list)
	}
}

func TestTakeRefusals(t *testing.T) {
	m := monitor(t)
	v := startVM(t, m)
	st := snapshot.NewStore(filepath.Join(t.TempDir(), "snapshots"))
	take(t, st, m, v, "taken")
	for name, mutate := range map[string]func(*snapshot.TakeParams) error{
		"bad name":      func(p *snapshot.TakeParams) error { p.Name = "../x"; return snapshot.ErrInvalidName },
		"name in use":   func(p *snapshot.TakeParams) error { p.Name = "taken"; return snapshot.ErrExists },
		"mounts":        func(p *snapshot.TakeParams) error { p.Mounts = []string{"/home/u/src"}; return snapshot.ErrHasMounts },
		"missing disk":  func(p *snapshot.TakeParams) error { p.Disk = "/nonexistent/disk.img"; return os.ErrNotExist },
		"stopped VM":    func(p *snapshot.TakeParams) error { p.Handle.PIDStart++; return vmm.ErrNotRunning },
		"missing disk2": func(p *snapshot.TakeParams) error { p.Disk = ""; return nil },
	} {
		t.Run(name, func(t *testing.T) {
			p := params(m, v, "other")
			want := mutate(&p)
			_, err := st.Take(context.Background(), p)
			if err == nil || (want != nil && !errors.Is(err, want)) {
				t.Fatalf("Take = %v, want an error wrapping %v", err, want)
			}
			t.Logf("refused: %v", err)
			if list, _ := st.List(); len(list) != 1 {
				t.Errorf("List after a refused Take = %+v, want only the first snapshot", list)
			}
			if ents, _ := os.ReadDir(st.Dir); len(ents) != 1 {
				t.Errorf("store holds %d entries after a refused Take, want 1", len(ents))
			}
			if got := state(t, v.h); got != "Running" {
				t.Errorf("VM state after a refused Take = %q, want Running", got)
			}
		})
	}
	// --force saves a VM with mounts, and records them.
	p := params(m, v, "with-mounts")
	p.Mounts, p.Force = []string{"/home/u/src"}, true
	if snap, err := st.Take(context.Background(), p); err != nil || len(snap.Mounts) != 1 {
		t.Fatalf("Take --force with mounts = %+v, %v", snap, err)
	}
}

// TestCorruptSnapshotRefused damages each file of a snapshot in turn: the
// restore is refused, names the file, and leaves no disk and no process.
func TestCorruptSnapshotRefused(t *testing.T) {
	m := monitor(t)
	v := startVM(t, m)
	st := snapshot.NewStore(filepath.Join(t.TempDir(), "snapshots"))
	snap := take(t, st, m, v, "s")
	for _, f := range snap.Files {
		t.Run(f.Name, func(t *testing.T) {
			p := filepath.Join(st.Path(snap), f.Name)
			orig, err := os.ReadFile(p) //nolint:gosec // test file
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = os.WriteFile(p, orig, 0o600) }) //nolint:gosec // test file
			bad := bytes.Clone(orig)
			bad[len(bad)/3] ^= 0x01                             // one bit, in the middle of the file
			if err := os.WriteFile(p, bad, 0o600); err != nil { //nolint:gosec // test file
				t.Fatal(err)
			}
			spec := newSpec(t, v.spec.Kernel)
			h, err := st.Restore(context.Background(), restoreParams(m, snap, spec))
			if err == nil {
				_, _ = m.Stop(context.Background(), h, 0)
				t.Fatal("Restore of a corrupted snapshot succeeded")
			}
			if !errors.Is(err, snapshot.ErrCorrupt) || !strings.Contains(err.Error(), f.Name) {
				t.Fatalf("Restore = %v, want ErrCorrupt naming %s", err, f.Name)
			}
			t.Logf("refused: %v", err)
			if _, err := os.Lstat(spec.Disk); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("disk %s left after a refused restore (%v)", spec.Disk, err)
			}
			if _, err := os.Stat(spec.RuntimeDir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("runtime dir %s made by a refused restore (%v)", spec.RuntimeDir, err)
			}
		})
	}
}

func TestRestoreRefusesOtherHosts(t *testing.T) {
	m := monitor(t)
	v := startVM(t, m)
	st := snapshot.NewStore(filepath.Join(t.TempDir(), "snapshots"))
	snap := take(t, st, m, v, "s")
	for name, mutate := range map[string]func(*snapshot.RestoreParams){
		"another monitor": func(p *snapshot.RestoreParams) { p.MonitorName = "qemu" },
		"another version": func(p *snapshot.RestoreParams) { p.Snapshot.Machine.MonitorVersion = "Firecracker v1.4.0" },
		"another CPU":     func(p *snapshot.RestoreParams) { p.Snapshot.Machine.CPUFeatures = strings.Repeat("0", 64) },
		"other memory":    func(p *snapshot.RestoreParams) { p.Spec.MemoryMiB = 128 },
	} {
		t.Run(name, func(t *testing.T) {
			p := restoreParams(m, snap, newSpec(t, v.spec.Kernel))
			mutate(&p)
			if h, err := st.Restore(context.Background(), p); !errors.Is(err, snapshot.ErrIncompatible) {
				if err == nil {
					_, _ = m.Stop(context.Background(), h, 0)
				}
				t.Fatalf("Restore = %v, want ErrIncompatible", err)
			} else {
				t.Logf("refused: %v", err)
			}
			if _, err := os.Lstat(p.Spec.Disk); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("disk left after a refused restore")
			}
		})
	}
}

func TestReconcile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snapshots")
	st := snapshot.NewStore(dir)
	write := func(id, phase string) {
		if err := os.MkdirAll(filepath.Join(dir, id), 0o700); err != nil {
			t.Fatal(err)
		}
		if phase == "" {
			return
		}
		b, _ := json.Marshal(snapshot.Snapshot{ID: id, Name: "n-" + id, Phase: phase, Source: snapshot.Source{VMID: "vm-" + id}})
		if err := os.WriteFile(filepath.Join(dir, id, snapshot.RecordName), b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, id, "fc-memory"), []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("0000000000000001", snapshot.PhaseReady)
	write("0000000000000002", snapshot.PhaseCreating)
	write("0000000000000003", snapshot.PhaseDeleting)
	write("0000000000000004", "") // made, no record yet
	write("0000000000000005", snapshot.PhaseReady)
	if err := os.WriteFile(filepath.Join(dir, "0000000000000005", snapshot.RecordName), []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	write("not-ours", "")
	if list, _ := st.List(); len(list) != 1 {
		t.Errorf("List before reconcile = %+v, want only the ready snapshot", list)
	}
	left, err := st.Reconcile()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	paused := ""
	for _, l := range left {
		got = append(got, l.Entry)
		if l.Snapshot != nil && l.Snapshot.Phase == snapshot.PhaseCreating {
			paused = l.Snapshot.Source.VMID
		}
	}
	want := "0000000000000002 0000000000000003 0000000000000004 0000000000000005"
	if strings.Join(got, " ") != want {
		t.Errorf("Reconcile removed %v, want %s", got, want)
	}
	if paused != "vm-0000000000000002" {
		t.Errorf("Reconcile names VM %q as possibly paused, want vm-0000000000000002", paused)
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "0000000000000001 not-ours" {
		t.Errorf("store after reconcile holds %v, want the ready snapshot and the entry that is not ours", names)
	}
}

// Crash injection: a child process (this test binary) takes or removes a
// snapshot of a VM the parent runs, and SIGKILLs itself at a failpoint, as
// a daemon crash would. Then start-up reconcile must leave no partial
// snapshot, nothing listed that is not whole, and the VM running.
const crashEnv = "BANGER_SNAPSHOT_CRASH"

type crashJob struct {
	Failpoint string     `json:"failpoint"`
	Store     string     `json:"store"`
	Op        string     `json:"op"` // "take", "rm" or "restore"
	Handle    vmm.Handle `json:"handle"`
	Disk      string     `json:"disk"`
	Spec      vmm.Spec   `json:"spec"` // for restore
	Binary    string     `json:"binary"`
}

func crashChild() int {
	var job crashJob
	if err := json.Unmarshal([]byte(os.Getenv(crashEnv)), &job); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	// Programs this child runs (the fake's --version) are not crash children.
	_ = os.Unsetenv(crashEnv)
	st := snapshot.NewStore(job.Store)
	st.Failpoint = func(name string) {
		if name == job.Failpoint {
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			time.Sleep(time.Minute)
		}
	}
	m := firecracker.New()
	m.Binary = job.Binary
	ctx := context.Background()
	var err error
	switch job.Op {
	case "take":
		_, err = st.Take(ctx, snapshot.TakeParams{Name: "crash", Source: snapshot.Source{VMID: "v"}, Machine: snapshot.Machine{Monitor: firecracker.Name, CPUs: 2, MemoryMiB: 64},
			Monitor: m, Handle: job.Handle, Disk: job.Disk})
	case "rm":
		_, err = st.Remove("keep", false, nil)
	case "restore":
		var snap snapshot.Snapshot
		if snap, err = st.Get("keep"); err == nil {
			_, err = st.Restore(ctx, snapshot.RestoreParams{Snapshot: snap, MonitorName: firecracker.Name, Monitor: m, Spec: job.Spec})
		}
	}
	fmt.Fprintf(os.Stderr, "crash child: %s finished without reaching %s: %v\n", job.Op, job.Failpoint, err)
	return 3
}

func TestCrashAtEachFailpoint(t *testing.T) {
	m := monitor(t)
	v := startVM(t, m)
	for _, tc := range []struct{ op, failpoint string }{
		{"take", snapshot.FailTakeIntent},
		{"take", snapshot.FailTakePaused},
		{"take", snapshot.FailTakeCopied},
		{"rm", snapshot.FailRemoveDeleted},
		{"restore", snapshot.FailRestoreDisk},
	} {
		t.Run(tc.failpoint, func(t *testing.T) {
			st := snapshot.NewStore(filepath.Join(t.TempDir(), "snapshots"))
			keep := take(t, st, m, v, "keep")
			spec := newSpec(t, v.spec.Kernel)
			job, _ := json.Marshal(crashJob{Failpoint: tc.failpoint, Store: st.Dir, Op: tc.op, Handle: v.h, Disk: v.spec.Disk, Spec: spec, Binary: m.Binary})
			self, _ := os.Executable()
			cmd := exec.Command(self, "-test.run=^$")
			cmd.Env = append(os.Environ(), crashEnv+"="+string(job))
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child did not die at %s: %v\n%s", tc.failpoint, err, out)
			}
			// A half-made snapshot is never listed, even before reconcile.
			list, err := st.List()
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range list {
				if s.ID != keep.ID && tc.op == "take" {
					t.Errorf("half-made snapshot listed: %+v", s)
				}
			}
			// Start-up: reconcile the store, resume the VMs it names.
			left, err := st.Reconcile()
			if err != nil {
				t.Fatal(err)
			}
			for _, l := range left {
				if l.Snapshot != nil && l.Snapshot.Phase == snapshot.PhaseCreating {
					if err := m.Resume(context.Background(), v.h); err != nil {
						t.Errorf("Resume the VM of an interrupted snapshot: %v", err)
					}
				}
			}
			if got := state(t, v.h); got != "Running" {
				t.Errorf("VM state after crash and reconcile = %q, want Running", got)
			}
			ents, _ := os.ReadDir(st.Dir)
			wantEntries := 1
			if tc.op == "rm" {
				wantEntries = 0
			}
			if len(ents) != wantEntries {
				t.Errorf("store holds %d entries after reconcile, want %d (left: %+v)", len(ents), wantEntries, left)
			}
			list, _ = st.List()
			if len(list) != wantEntries {
				t.Errorf("List after reconcile = %+v, want %d snapshots", list, wantEntries)
			}
			if tc.op == "restore" {
				// The daemon owns the new VM's dir and removes it with the
				// VM; the store must not have started a monitor.
				if pids := pidsMentioning(spec.RuntimeDir); len(pids) > 0 {
					t.Errorf("monitor processes after a crash before launch: %v", pids)
				}
			}
			if err := st.Verify(context.Background(), keep); tc.op != "rm" && err != nil {
				t.Errorf("the untouched snapshot no longer verifies: %v", err)
			}
		})
	}
}

func pidsMentioning(s string) []string {
	var pids []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")) //nolint:gosec // procfs
		if err == nil && bytes.Contains(b, []byte(s)) {
			pids = append(pids, e.Name())
		}
	}
	return pids
}
