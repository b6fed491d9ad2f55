package snapshot

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// TestE2ESnapshotCrashInjection SIGKILLs the daemon at each failpoint of
// snapshot, restore, clone and snapshot rm (VMs on the spec-checked fake
// Firecracker). After each kill the daemon starts again and the test
// checks: no half-made snapshot listed or left on disk, the source VM
// running (not left paused), no leaked taps, disks, processes or dirs, and
// every VM record in a state it can leave.
func TestE2ESnapshotCrashInjection(t *testing.T) {
	e := e2etest.FakeEnv(t, nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "src", "--memory", "256M", "--cpus", "1")
	d.MustCLI(ctx, "vm", "start", "src", "--wait")
	d.MustCLI(ctx, "vm", "snapshot", "src", "base")
	// tgt, of src's shape, is restored into (vm start --from-snapshot);
	// clones get their disk at create and never reach restore:disk.
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "tgt", "--memory", "256M", "--cpus", "1")

	snapDirs := func() []string {
		ents, _ := os.ReadDir(filepath.Join(d.StateDir(), "snapshots"))
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		return names
	}
	n := 0
	for _, tc := range []struct {
		failpoint string
		args      func() []string
	}{
		{"snapshot:intent", func() []string { return []string{"vm", "snapshot", "src", "crash"} }},
		{"snapshot:paused", func() []string { return []string{"vm", "snapshot", "src", "crash"} }},
		{"snapshot:copied", func() []string { return []string{"vm", "snapshot", "src", "crash"} }},
		{"clone:disk", func() []string { n++; return []string{"vm", "clone", "base", "--name", fmt.Sprintf("k%d", n)} }},
		{"restore:disk", func() []string { return []string{"vm", "start", "tgt", "--from-snapshot", "base", "--wait"} }},
		{"restore:vmm", func() []string { n++; return []string{"vm", "clone", "base", "--name", fmt.Sprintf("k%d", n)} }},
		{"snapshot:rm-intent", func() []string { return []string{"snapshot", "rm", "--force", "base"} }},
	} {
		t.Run(tc.failpoint, func(t *testing.T) {
			d := d.For(t)
			dirsBefore := snapDirs()
			d.Stop()
			d.StartEnv(map[string]string{"BANGER_FAILPOINT": tc.failpoint})
			logBefore := len(d.Log())
			r := d.CLI(ctx, tc.args()...)
			d.Kill()
			if !strings.Contains(d.Log()[logBefore:], "failpoint "+tc.failpoint+" reached") {
				t.Fatalf("failpoint %s not reached: exit %d %s", tc.failpoint, r.Code, r.Stderr)
			}
			d.Start()
			e2etest.WaitSettled(ctx, t, d, 30*time.Second)

			var snaps []api.Snapshot
			d.JSON(ctx, &snaps, "snapshot", "ls")
			wantSnaps := 1
			if tc.failpoint == "snapshot:rm-intent" {
				wantSnaps = 0
			}
			if len(snaps) != wantSnaps || (wantSnaps == 1 && snaps[0].Name != "base") {
				t.Errorf("snapshot ls after the crash = %+v, want %d (base)", snaps, wantSnaps)
			}
			if dirs := snapDirs(); len(dirs) != wantSnaps {
				t.Errorf("snapshot dirs after the crash: %v (before: %v), want %d", dirs, dirsBefore, wantSnaps)
			}
			src := e2etest.Inspect(ctx, t, d, "src")
			if src.State != model.VMRunning {
				t.Errorf("src is %s after the crash, want running", src.State)
			}
			if info, err := firecracker.NewClient(src.Runtime.Monitor.APISocket).DescribeInstance(ctx); err != nil || info.State != "Running" {
				t.Errorf("src's monitor reports %+v, %v; want Running (not left paused)", info, err)
			}
			e2etest.WithStore(t, d, func(_ *store.Store, recs []model.VM) {
				for _, s := range e2etest.Leaks(t, e, recs) {
					t.Errorf("after a crash at %s: %s", tc.failpoint, s)
				}
				for _, v := range recs {
					if v.State == model.VMStarting || v.State == model.VMStopping {
						t.Errorf("VM %s is %s after reconcile", v.Name, v.State)
					}
				}
			})
			if t.Failed() {
				t.Logf("daemon log tail:\n%s", e2etest.Tail(d.Log(), 40))
			}
		})
	}
	// A clone still works after all that, and gets its own identity.
	if err := tryClone(ctx, d, "after"); err != nil {
		t.Fatal(err)
	}
	var vms []api.VMSummary
	d.JSON(ctx, &vms, "vm", "ls")
	for _, v := range vms {
		d.MustCLI(ctx, "vm", "rm", "--force", v.Name)
	}
	d.MustCLI(ctx, "snapshot", "rm", "--force", "base2")
	e2etest.WithStore(t, d, func(_ *store.Store, recs []model.VM) {
		for _, s := range e2etest.Leaks(t, e, recs) {
			t.Errorf("after removing every VM: %s", s)
		}
	})
	if dirs := snapDirs(); len(dirs) != 0 {
		t.Errorf("snapshot dirs left: %v", dirs)
	}
}

// tryClone takes a new snapshot of src and clones it.
func tryClone(ctx context.Context, d *e2etest.Daemon, name string) error {
	d.MustCLI(ctx, "vm", "snapshot", "src", "base2")
	d.MustCLI(ctx, "vm", "clone", "base2", "--name", name)
	var vm api.VM
	d.JSON(ctx, &vm, "vm", "inspect", name)
	if vm.State != model.VMRunning || vm.HostKey == "" {
		return fmt.Errorf("clone %s after the crashes: %+v", name, vm)
	}
	return nil
}
