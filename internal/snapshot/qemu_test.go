package snapshot_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/snapshot"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/qemu"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

// TestQEMUSnapshotMemoryAndDisk saves a real QEMU (TCG) guest that counts
// in memory and writes each count, synced, to its disk; restores it twice
// at once (two clones); and checks that each clone goes on counting from
// the saved count and that the disk holds every count the guest had
// written before the snapshot.
func TestQEMUSnapshotMemoryAndDisk(t *testing.T) {
	testutil.RequiresVM(t)
	kernel, modules := vmmtest.DebianKernel(t)
	initrd := vmmtest.BusyboxInitramfs(t, modules)
	m := qemu.New()
	specFor := func(name string) vmm.Spec {
		dir := t.TempDir()
		return vmm.Spec{
			VMID: "01SNAPQEMU" + strings.ToUpper(name), Name: name, CPUs: 1, MemoryMiB: 256,
			Kernel: kernel, Initrd: initrd, Cmdline: "console=ttyS0 panic=-1 loglevel=4",
			Disk: filepath.Join(dir, "disk.img"), RuntimeDir: filepath.Join(dir, "run"), ConsoleLog: filepath.Join(dir, "console.log"),
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	saved := specFor("saved")
	if err := os.WriteFile(saved.Disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(saved.Disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	h, err := m.Start(ctx, saved)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })
	waitFor(t, "3 ticks on the saved guest's console", 90*time.Second, func() bool { return len(vmmtest.Ticks(saved.ConsoleLog)) >= 3 })
	if got := vmmtest.DiskTicks(saved.Disk); len(got) == 0 {
		t.Fatalf("the guest wrote no ticks to its disk (is virtio_blk loaded?):\n%s", readTail(saved.ConsoleLog))
	}

	st := snapshot.NewStore(filepath.Join(t.TempDir(), "snapshots"))
	before := vmmtest.Ticks(saved.ConsoleLog)
	snap, err := st.Take(ctx, snapshot.TakeParams{
		Name: "counting", Source: snapshot.Source{VMID: saved.VMID, VMName: saved.Name},
		Machine: snapshot.Machine{Monitor: qemu.Name, Kernel: kernel, Initrd: initrd, Cmdline: saved.Cmdline, CPUs: saved.CPUs, MemoryMiB: saved.MemoryMiB},
		Monitor: m, Handle: h, Disk: saved.Disk,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshot: pause %v, %d MiB allocated on disk (apparent %d MiB) for a %d MiB guest with a 16 MiB disk",
		snap.Pause.Round(time.Millisecond), snap.SizeOnDisk()>>20, snap.Size()>>20, saved.MemoryMiB)
	onDisk := vmmtest.DiskTicks(filepath.Join(st.Path(snap), snapshot.DiskFileName))
	for _, n := range before {
		if !slices.Contains(onDisk, n) {
			t.Errorf("tick %d was printed (after its sync) before the snapshot, but the snapshot's disk lacks it (disk has %v)", n, onDisk)
		}
	}
	if _, err := m.Stop(ctx, h, 0); err != nil {
		t.Fatal(err)
	}

	// Two clones of the one snapshot, running at the same time.
	var clones []vmm.Spec
	for _, name := range []string{"clone1", "clone2"} {
		spec := specFor(name)
		begin := time.Now()
		ch, err := st.Restore(ctx, snapshot.RestoreParams{Snapshot: snap, MonitorName: qemu.Name, Monitor: m, Spec: spec})
		if err != nil {
			t.Fatalf("Restore %s: %v", name, err)
		}
		t.Logf("%s: restored (checksums verified, disk copied, state loaded) in %v", name, time.Since(begin).Round(time.Millisecond))
		t.Cleanup(func() { _, _ = m.Stop(context.Background(), ch, 0) })
		clones = append(clones, spec)
	}
	for _, spec := range clones {
		vmmtest.TicksContinue(t, saved, spec)
		// The clone's disk holds the saved ticks and gets its own new ones.
		last := before[len(before)-1]
		waitFor(t, spec.Name+"'s next ticks on its own disk", 30*time.Second, func() bool {
			d := vmmtest.DiskTicks(spec.Disk)
			return len(d) > 0 && d[len(d)-1] > last+1
		})
		d := vmmtest.DiskTicks(spec.Disk)
		for _, n := range before {
			if !slices.Contains(d, n) {
				t.Errorf("%s's disk lacks saved tick %d", spec.Name, n)
			}
		}
	}
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func readTail(path string) string {
	b, _ := os.ReadFile(path) //nolint:gosec // test log
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}
