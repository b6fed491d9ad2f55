// Package snapshotbusybox holds the snapshot timings on an image without
// systemd (busybox on banger's PID 1), in a package of its own so that the
// snapshot package stays well inside go test's 10 minutes.
package snapshotbusybox

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

func mib(n int64) string { return strconv.FormatInt(n>>20, 10) + " MiB" }

// TestE2ESnapshotBusybox is the timing of the issue on an image without
// systemd (busybox on banger's PID 1): cold vm run to ready, vm clone to
// ready and vm start --from-snapshot to ready, in the same run. The VM has
// a --mount folder: vm snapshot refuses it without --force (nothing saved,
// the VM runs on); with --force the snapshot records the folder, and the
// clone and the restored VM mount it again, showing a file written on the
// host after the snapshot.
func TestE2ESnapshotBusybox(t *testing.T) {
	// The main process counts in memory for ever.
	e := e2etest.SetupBusybox(t, nil, "busybox", "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done", nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	// A host folder (--mount): its contents are not part of a snapshot.
	share := filepath.Join(t.TempDir(), "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(share, "before.txt"), []byte("saved before\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mount := share + ":/mnt/host"
	begin := time.Now()
	d.MustCLI(ctx, "vm", "run", "--image", "busybox", "--name", "bb", "--memory", "256M", "--mount", mount)
	cold := time.Since(begin)
	readMount(ctx, t, d, "bb", "before.txt", "saved before\n")

	// Refused without --force, saying why and what --force does; nothing
	// is saved and the VM runs on.
	r := d.CLI(ctx, "vm", "snapshot", "bb", "bbsnap")
	if r.Code == 0 || !strings.Contains(r.Stderr, "--mount folders "+mount+",") || !strings.Contains(r.Stderr, "--force") || !strings.Contains(r.Stderr, "re-attaches the mounts empty") {
		t.Errorf("vm snapshot of a VM with --mount: exit %d, stderr %q; want a refusal naming the folder and --force", r.Code, r.Stderr)
	}
	var list []api.Snapshot
	if d.JSON(ctx, &list, "snapshot", "ls"); len(list) != 0 {
		t.Errorf("a refused snapshot is listed: %+v", list)
	}
	if vm := inspect(ctx, t, d, "bb"); vm.State != model.VMRunning {
		t.Errorf("bb is %s after a refused snapshot", vm.State)
	}
	var res api.SnapshotVMResult
	d.JSON(ctx, &res, "vm", "snapshot", "bb", "bbsnap", "--force")
	if len(res.Snapshot.Mounts) != 1 || res.Snapshot.Mounts[0] != mount {
		t.Errorf("snapshot --force records mounts %q, want [%s]", res.Snapshot.Mounts, mount)
	}
	// Written after the snapshot: a restore shows the folder as it is then.
	if err := os.WriteFile(filepath.Join(share, "after.txt"), []byte("written after\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	begin = time.Now()
	d.MustCLI(ctx, "vm", "clone", "bbsnap", "--name", "bb2")
	clone := time.Since(begin)
	if vm := inspect(ctx, t, d, "bb2"); vm.State != model.VMRunning || vm.HostKey == "" || len(vm.Mounts) != 1 || vm.Mounts[0] != mount {
		t.Errorf("clone bb2: %s, host key %q, mounts %v; want running with its own host key and %s", vm.State, vm.HostKey, vm.Mounts, mount)
	}
	readMount(ctx, t, d, "bb2", "after.txt", "written after\n")
	d.MustCLI(ctx, "vm", "stop", "bb")
	begin = time.Now()
	d.MustCLI(ctx, "vm", "start", "bb", "--from-snapshot", "bbsnap", "--wait")
	restore := time.Since(begin)
	if vm := inspect(ctx, t, d, "bb"); vm.State != model.VMRunning {
		t.Errorf("bb restored is %s", vm.State)
	}
	readMount(ctx, t, d, "bb", "after.txt", "written after\n")
	t.Logf("BENCH busybox image (banger PID 1), 256 MiB, QEMU TCG: cold vm run to ready %v; vm clone to ready %v (%.1fx faster); vm start --from-snapshot to ready %v (%.1fx faster); pause %v; snapshot %s on disk",
		cold.Round(100*time.Millisecond), clone.Round(100*time.Millisecond), float64(cold)/float64(clone),
		restore.Round(100*time.Millisecond), float64(cold)/float64(restore), res.Snapshot.Pause.Round(time.Millisecond), mib(res.Snapshot.SizeOnDisk))
	// Where the time went, from the daemon's log.
	if log, err := os.ReadFile(d.LogPath); err == nil {
		for _, line := range strings.Split(string(log), "\n") {
			for _, m := range []string{"disk copied", "restored from snapshot", "restored VM ready", "clone created"} {
				if strings.Contains(line, m) {
					t.Logf("phase: %.400s", line)
				}
			}
		}
	}
	d.MustCLI(ctx, "vm", "rm", "--force", "bb", "bb2")
	d.MustCLI(ctx, "snapshot", "rm", "bbsnap")
	e2etest.AssertNoVMResources(t, e, true)
}

// readMount waits (the folders are mounted once the VM is ready) until the
// guest vm reads want in /mnt/host/name.
func readMount(ctx context.Context, t *testing.T, d *e2etest.Daemon, vm, name, want string) {
	t.Helper()
	var last e2etest.Result
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if last = d.CLI(ctx, "exec", vm, "--", "cat", "/mnt/host/"+name); last.Code == 0 && last.Stdout == want {
			return
		}
	}
	t.Errorf("%s reads /mnt/host/%s: exit %d, %q, stderr %q; want %q", vm, name, last.Code, last.Stdout, last.Stderr, want)
}

// inspect is vm inspect's view (e2etest.Inspect decodes the record, whose
// mounts are not strings).
func inspect(ctx context.Context, t *testing.T, d *e2etest.Daemon, name string) api.VM {
	t.Helper()
	var vm api.VM
	d.JSON(ctx, &vm, "vm", "inspect", name)
	return vm
}
