// Package snapshotbusybox holds the snapshot timings on an image without
// systemd (busybox on banger's PID 1), in a package of its own so that the
// snapshot package stays well inside go test's 10 minutes.
package snapshotbusybox

import (
	"context"
	"strconv"
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
// ready and vm start --from-snapshot to ready, in the same run.
func TestE2ESnapshotBusybox(t *testing.T) {
	// The main process counts in memory for ever.
	e := e2etest.SetupBusybox(t, nil, "busybox", "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done", nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	begin := time.Now()
	d.MustCLI(ctx, "vm", "run", "--image", "busybox", "--name", "bb", "--memory", "256M")
	cold := time.Since(begin)
	var res api.SnapshotVMResult
	d.JSON(ctx, &res, "vm", "snapshot", "bb", "bbsnap")
	begin = time.Now()
	d.MustCLI(ctx, "vm", "clone", "bbsnap", "--name", "bb2")
	clone := time.Since(begin)
	if vm := e2etest.Inspect(ctx, t, d, "bb2"); vm.State != model.VMRunning || vm.HostKey == "" {
		t.Errorf("clone bb2: %s, host key %q; want running with its own host key", vm.State, vm.HostKey)
	}
	d.MustCLI(ctx, "vm", "stop", "bb")
	begin = time.Now()
	d.MustCLI(ctx, "vm", "start", "bb", "--from-snapshot", "bbsnap", "--wait")
	restore := time.Since(begin)
	if vm := e2etest.Inspect(ctx, t, d, "bb"); vm.State != model.VMRunning {
		t.Errorf("bb restored is %s", vm.State)
	}
	t.Logf("BENCH busybox image (banger PID 1), 256 MiB, QEMU TCG: cold vm run to ready %v; vm clone to ready %v (%.1fx faster); vm start --from-snapshot to ready %v (%.1fx faster); pause %v; snapshot %s on disk",
		cold.Round(100*time.Millisecond), clone.Round(100*time.Millisecond), float64(cold)/float64(clone),
		restore.Round(100*time.Millisecond), float64(cold)/float64(restore), res.Snapshot.Pause.Round(time.Millisecond), mib(res.Snapshot.SizeOnDisk))
	d.MustCLI(ctx, "vm", "rm", "--force", "bb", "bb2")
	d.MustCLI(ctx, "snapshot", "rm", "bbsnap")
	e2etest.AssertNoVMResources(t, e, true)
}
