// Package bench holds the VM lifecycle benchmark (BANGER_BENCH=1, make
// bench): start overhead per disk driver, boot times, daemon RSS.
package bench

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// TestBenchVMLifecycle measures, on this host: the start overhead (from the
// start request to the VM monitor running with every device attached,
// guest boot excluded) for each disk driver available, boot to
// agent-healthy and to SSH-ready, and the daemon's RSS with 3 VMs running.
// It runs only with BANGER_BENCH=1 (make bench).
func TestBenchVMLifecycle(t *testing.T) {
	testutil.OptIn(t, "BANGER_BENCH", "benchmark (make bench)")
	drivers := []struct {
		name  string
		fs    string // file system for the state dir: "" = the default, "xfs" = a loop-mounted XFS (reflinks)
		extra map[string]any
	}{
		{"copy", "", map[string]any{"disk_driver": "copy"}},
		{"reflink", "xfs", map[string]any{"disk_driver": "reflink"}},
	}
	for _, drv := range drivers {
		t.Run(drv.name, func(t *testing.T) {
			extra := drv.extra
			if drv.fs == "xfs" {
				testutil.RequiresTool(t, "mkfs.xfs") // the reflink driver needs XFS (apt-get install xfsprogs)
				dir := xfsDir(t)
				extra = map[string]any{"disk_driver": "reflink", "state_dir": filepath.Join(dir, "state")}
			}
			e := e2etest.Setup(t, extra)
			d := e.D
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
			defer cancel()
			var overheads []time.Duration
			n := 3
			for i := range n {
				name := "b" + strconv.Itoa(i)
				d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", name, "--memory", "512M", "--cpus", "1")
				start := time.Now()
				d.MustCLI(ctx, "vm", "start", name)
				overheads = append(overheads, time.Since(start))
			}
			for i := range n {
				d.MustCLI(ctx, "ssh", "b"+strconv.Itoa(i), "--", "true")
			}
			var vm model.VM
			d.JSON(ctx, &vm, "vm", "inspect", "b0")
			rss := daemonRSS(t, e.NS)
			logged := loggedOverheads(t, d.LogPath)
			agent, ready := bootTimes(t, d.LogPath)
			t.Logf("driver %s: start request to monitor running (CLI round trip): %v", drv.name, overheads)
			t.Logf("driver %s: start overhead logged by the daemon: %v", drv.name, logged)
			t.Logf("boot to agent-healthy: %v; boot to ssh-ready: %v (3 VMs booting at once under %s)", agent, ready, vm.VMM)
			t.Logf("daemon RSS with %d VMs running: %.1f MiB", n, rss)
			for i := range n {
				d.MustCLI(ctx, "vm", "rm", "--force", "b"+strconv.Itoa(i))
			}
		})
	}
}

// xfsDir mounts a fresh XFS file system (reflink=1) on a loop device and
// returns its mount point.
func xfsDir(t *testing.T) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "xfs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 8<<30); err != nil {
		t.Fatal(err)
	}
	if out, err := e2etest.CombinedOutput(exec.Command("mkfs.xfs", "-q", "-m", "reflink=1", img)); err != nil {
		t.Fatalf("mkfs.xfs: %v: %s", err, out)
	}
	mnt, err := os.MkdirTemp("", "xfs-")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := e2etest.CombinedOutput(exec.Command("mount", "-o", "loop", img, mnt)); err != nil {
		t.Fatalf("mount xfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		_ = exec.Command("umount", "-l", mnt).Run()
		_ = os.Remove(mnt)
	})
	return mnt
}

func daemonRSS(t *testing.T, ns *e2etest.NetNS) float64 {
	t.Helper()
	for _, pid := range ns.PIDs() {
		cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if !strings.Contains(string(cmdline), "daemon\x00--config") {
			continue
		}
		status, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
		for _, line := range strings.Split(string(status), "\n") {
			if strings.HasPrefix(line, "VmRSS:") {
				kb, _ := strconv.ParseFloat(strings.Fields(line)[1], 64)
				return kb / 1024
			}
		}
	}
	t.Fatal("no daemon process found in the namespace")
	return 0
}

var overheadRE = regexp.MustCompile(`msg="VM monitor started".* start_overhead=([0-9.]+[µm]?s)`)

func loggedOverheads(t *testing.T, logPath string) []string {
	t.Helper()
	f, err := os.Open(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := overheadRE.FindStringSubmatch(sc.Text()); m != nil {
			out = append(out, m[1])
		}
	}
	return out
}

var logTimeRE = regexp.MustCompile(`^time=(\S+) .*msg="([^"]+)".* vm=(\S+)`)

// bootTimes returns, per VM, the time from "VM monitor started" to "guest
// agent healthy" and to "VM ready", from the daemon's log.
func bootTimes(t *testing.T, logPath string) (agent, ready []time.Duration) {
	t.Helper()
	f, err := os.Open(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	started := map[string]time.Time{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		m := logTimeRE.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		ts, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil {
			continue
		}
		switch m[2] {
		case "VM monitor started":
			started[m[3]] = ts
		case "guest agent healthy":
			agent = append(agent, ts.Sub(started[m[3]]).Round(100*time.Millisecond))
		case "VM ready":
			ready = append(ready, ts.Sub(started[m[3]]).Round(100*time.Millisecond))
		}
	}
	return agent, ready
}
