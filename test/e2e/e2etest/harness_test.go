package e2etest_test

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// report is what testdata/leaky's TestLeak made (its Report).
type report struct {
	RunDir string `json:"run_dir"`
	NetNS  string `json:"netns"`
	Procs  []struct {
		vmm.Handle
		Comm string `json:"comm"`
	} `json:"procs"`
	QEMU     int    `json:"qemu"`
	Loop     string `json:"loop"`
	LoopFile string `json:"loop_file"`
	Mount    string `json:"mount"`
}

// detached reports whether a process is one the harness cannot tie to the
// test binary: a VM monitor, started with setsid by the daemon (or, in
// TestLeak, the same way).
func detached(comm string) bool {
	return strings.HasPrefix(comm, "qemu") || strings.HasPrefix(comm, "banger-fake-fi")
}

// TestE2EHarnessKilledRun runs a tiny end-to-end package
// (testdata/leaky) that makes one of everything a run can leave behind,
// kills it — once by go test's -timeout, once by SIGKILL with a daemon
// running a VM — and checks:
//   - its helpers (busybox httpd, docker-registry, the daemon) died with it
//     (Pdeathsig), while the detached VM monitors, the namespace, the loop
//     device, the mount and the run dir are left;
//   - the next harness start (the same binary running no test) clears all
//     of that and leaves this live run's directory alone.
func TestE2EHarnessKilledRun(t *testing.T) {
	testutil.RequiresNetNS(t)
	testutil.RequiresLoop(t)
	testutil.RequiresVM(t) // -short skips it: it starts a daemon and QEMU
	testutil.RequiresTool(t, "busybox", "go")
	bin := filepath.Join(t.TempDir(), "leaky.test")
	if out, err := e2etest.CombinedOutput(exec.Command("go", "test", "-c", "-o", bin, "./testdata/leaky")); err != nil {
		t.Fatalf("build testdata/leaky: %v\n%s", err, out)
	}
	for _, tc := range []struct {
		name, mode string
		kill       bool
	}{
		{"timeout", "light", false},
		{"sigkill", "full", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.mode == "full" {
				testutil.RequiresTool(t, "docker-registry", "skopeo", "mkfs.ext4", "debugfs", "nft")
			}
			dir := t.TempDir()
			reportPath := filepath.Join(dir, "report.json")
			logPath := filepath.Join(dir, "leaky.log")
			logf, err := os.Create(logPath)
			if err != nil {
				t.Fatal(err)
			}
			defer logf.Close()
			args := []string{"-test.run=^TestLeak$", "-test.v"}
			if !tc.kill {
				args = append(args, "-test.timeout=10s")
			}
			child := exec.Command(bin, args...)
			child.Dir = filepath.Join("testdata", "leaky")
			child.Env = append(os.Environ(), "BANGER_E2E_LEAKY="+reportPath, "BANGER_E2E_LEAKY_MODE="+tc.mode)
			child.Stdout, child.Stderr = logf, logf
			if err := e2etest.Start(child); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- child.Wait() }()
			childLog := func() string { b, _ := os.ReadFile(logPath); return string(b) }

			// Wait for everything to be made.
			deadline := time.After(4 * time.Minute)
		wait:
			for {
				if _, err := os.Stat(reportPath); err == nil {
					break
				}
				select {
				case err := <-exited:
					t.Fatalf("leaky test exited (%v) before making everything:\n%s", err, e2etest.Tail(childLog(), 60))
				case <-deadline:
					_ = child.Process.Kill()
					t.Fatalf("leaky test made nothing in 4 minutes:\n%s", e2etest.Tail(childLog(), 60))
				case <-time.After(100 * time.Millisecond):
					continue wait
				}
			}
			var rep report
			raw, _ := os.ReadFile(reportPath)
			if err := json.Unmarshal(raw, &rep); err != nil {
				t.Fatalf("report %s: %v", raw, err)
			}
			if tc.kill {
				_ = child.Process.Kill()
				<-exited
			} else {
				err := <-exited
				var ee *exec.ExitError
				if !errors.As(err, &ee) || !strings.Contains(childLog(), "panic: test timed out") {
					t.Fatalf("leaky test was not ended by -test.timeout (%v):\n%s", err, e2etest.Tail(childLog(), 60))
				}
			}

			// What the dead run left.
			var monitors, helpers int
			for _, p := range rep.Procs {
				if detached(p.Comm) {
					monitors++
					if ok, _ := vmm.Alive(p.Handle); !ok {
						t.Errorf("VM monitor %d (%s) died with the test binary; the test proves nothing for it", p.PID, p.Comm)
					}
					continue
				}
				helpers++
				if !eventually(5*time.Second, func() bool { ok, _ := vmm.Alive(p.Handle); return !ok }) {
					t.Errorf("helper %d (%s) outlived the test binary: no parent-death signal", p.PID, p.Comm)
				}
			}
			wantMonitors, wantHelpers := 1, 1 // QEMU; busybox httpd
			if tc.mode == "full" {
				wantMonitors, wantHelpers = 2, 3 // + the fake Firecracker; + docker-registry and the daemon
			}
			if monitors != wantMonitors || helpers < wantHelpers {
				t.Errorf("the leaky run made %d monitors and %d helpers, want %d and %d: %+v", monitors, helpers, wantMonitors, wantHelpers, rep.Procs)
			}
			left := leftovers(rep)
			if len(left) != 5 {
				t.Fatalf("after the kill, left: %v; want the run dir, namespace, loop, mount and a live monitor", left)
			}

			// The next harness start clears it.
			out, err := e2etest.CombinedOutput(exec.Command(bin, "-test.run=^$"))
			if err != nil {
				t.Fatalf("the next harness start failed: %v\n%s", err, out)
			}
			runID := filepath.Base(rep.RunDir)
			if !strings.Contains(string(out), "cleared leftovers of run(s)") || !strings.Contains(string(out), runID) {
				t.Errorf("the next harness start did not report clearing run %s:\n%s", runID, out)
			}
			t.Logf("next harness start:\n%s", out)
			if left := leftovers(rep); len(left) != 0 {
				t.Errorf("after the next harness start, still left: %v", left)
			}
			for _, p := range rep.Procs {
				if ok, _ := vmm.Alive(p.Handle); ok {
					t.Errorf("process %d (%s) still runs after the next harness start", p.PID, p.Comm)
				}
			}
			// A live run is not swept.
			if _, err := os.Stat(filepath.Join(e2etest.RunDir(), "owner")); err != nil {
				t.Errorf("the sweep removed this live run's directory: %v", err)
			}
		})
	}
}

// TestE2EHarnessInterruptedRun: a run stopped by SIGTERM (or Ctrl-C)
// clears itself before it exits, VM monitor included, with no next start.
func TestE2EHarnessInterruptedRun(t *testing.T) {
	testutil.RequiresNetNS(t)
	testutil.RequiresLoop(t)
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "busybox", "go")
	dir := t.TempDir()
	bin := filepath.Join(dir, "leaky.test")
	if out, err := e2etest.CombinedOutput(exec.Command("go", "test", "-c", "-o", bin, "./testdata/leaky")); err != nil {
		t.Fatalf("build testdata/leaky: %v\n%s", err, out)
	}
	reportPath := filepath.Join(dir, "report.json")
	child := exec.Command(bin, "-test.run=^TestLeak$", "-test.v")
	child.Dir = filepath.Join("testdata", "leaky")
	child.Env = append(os.Environ(), "BANGER_E2E_LEAKY="+reportPath, "BANGER_E2E_LEAKY_MODE=light")
	var out strings.Builder
	child.Stdout, child.Stderr = &out, &out
	if err := e2etest.Start(child); err != nil {
		t.Fatal(err)
	}
	if !eventually(2*time.Minute, func() bool { _, err := os.Stat(reportPath); return err == nil }) {
		_ = child.Process.Kill()
		_ = child.Wait()
		t.Fatalf("leaky test made nothing in 2 minutes:\n%s", out.String())
	}
	var rep report
	raw, _ := os.ReadFile(reportPath)
	if err := json.Unmarshal(raw, &rep); err != nil {
		t.Fatalf("report %s: %v", raw, err)
	}
	if len(leftovers(rep)) != 5 {
		t.Fatalf("the leaky run made %v, want the run dir, namespace, loop, mount and a live monitor", leftovers(rep))
	}
	if err := child.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	_ = child.Wait()
	if !strings.Contains(out.String(), "clearing run") {
		t.Errorf("the interrupted run did not say it cleared itself:\n%s", e2etest.Tail(out.String(), 30))
	}
	if left := leftovers(rep); len(left) != 0 {
		t.Errorf("after SIGTERM, still left: %v", left)
	}
	for _, p := range rep.Procs {
		if ok, _ := vmm.Alive(p.Handle); ok {
			t.Errorf("process %d (%s) still runs after SIGTERM", p.PID, p.Comm)
		}
	}
}

// leftovers lists what of rep is still on the host: the run dir, the
// namespace, the loop device, the mount, and whether a monitor lives.
func leftovers(rep report) []string {
	var out []string
	if _, err := os.Stat(rep.RunDir); err == nil {
		out = append(out, "run dir "+rep.RunDir)
	}
	if _, err := os.Stat(filepath.Join("/run/netns", rep.NetNS)); err == nil {
		out = append(out, "netns "+rep.NetNS)
	}
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(rep.Loop) + "/loop/backing_file"); err == nil &&
		strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)") == rep.LoopFile {
		out = append(out, "loop "+rep.Loop)
	}
	if mi, err := os.ReadFile("/proc/self/mountinfo"); err == nil && strings.Contains(string(mi), " "+rep.Mount+" ") {
		out = append(out, "mount "+rep.Mount)
	}
	for _, p := range rep.Procs {
		if ok, _ := vmm.Alive(p.Handle); ok && detached(p.Comm) {
			out = append(out, "monitor "+p.Comm)
			break
		}
	}
	return out
}

func eventually(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}
