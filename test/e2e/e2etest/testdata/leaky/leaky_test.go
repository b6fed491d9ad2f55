// Package leaky is run only by e2etest's TestE2EHarnessKilledRun, which
// builds it, lets it make one of everything a harness run can leave
// behind, kills it, and checks that the next harness start clears it all.
// It lives under testdata so that go test ./... does not run it.
package leaky

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// TestLeak makes, in mode "light": a namespace, busybox httpd in it (a
// helper: Pdeathsig), a QEMU process started detached as the daemon starts
// VM monitors (setsid, no Pdeathsig), a loop device on a file in the run
// dir and a tmpfs mounted in it; in mode "full" also a registry and a
// daemon running a VM on the fake Firecracker. It writes what it made to
// the report file named by BANGER_E2E_LEAKY and waits to be killed.
func TestLeak(t *testing.T) {
	reportPath := os.Getenv("BANGER_E2E_LEAKY")
	if reportPath == "" {
		t.Fatal("run by e2etest's TestE2EHarnessKilledRun only (BANGER_E2E_LEAKY names its report file)")
	}
	ns := e2etest.NewNetNS(t)
	ns.Serve(t, "busybox", "httpd", "-f", "-p", "127.0.0.1:8080", "-h", t.TempDir())
	if os.Getenv("BANGER_E2E_LEAKY_MODE") == "full" {
		fakeVM(t, ns)
	}
	console := filepath.Join(t.TempDir(), "console.log")
	qemu, err := vmm.StartDetached(ns.Cmd("qemu-system-x86_64", "-M", "none", "-display", "none",
		"-monitor", "none", "-serial", "none", "-pidfile", filepath.Join(t.TempDir(), "qemu.pid")), console)
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "loop.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := e2etest.CombinedOutput(exec.Command("losetup", "-f", "--show", img))
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	mnt := t.TempDir()
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}

	rep := Report{RunDir: e2etest.RunDir(), NetNS: ns.Name, Loop: strings.TrimSpace(string(out)), LoopFile: img, Mount: mnt}
	time.Sleep(200 * time.Millisecond) // let ip netns exec become its program
	for _, pid := range ns.PIDs() {
		comm, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
		h, err := vmm.Identify(pid)
		if err != nil {
			continue
		}
		rep.Procs = append(rep.Procs, Proc{Handle: h, Comm: strings.TrimSpace(string(comm))})
	}
	rep.QEMU = qemu.Handle.PID
	raw, _ := json.Marshal(rep)
	if err := os.WriteFile(reportPath+".tmp", raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(reportPath+".tmp", reportPath); err != nil {
		t.Fatal(err)
	}
	t.Log("made everything; waiting to be killed")
	select {}
}

// fakeVM starts a registry and a daemon in ns and a VM on the fake
// Firecracker.
func fakeVM(t *testing.T, ns *e2etest.NetNS) {
	e := e2etest.FakeEnvIn(t, ns, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e.D.MustCLI(ctx, "vm", "run", "--image", e.Image, "--name", "leak", "--memory", "256M", "--cpus", "1")
}

// Report is what TestLeak made.
type Report struct {
	RunDir   string `json:"run_dir"`
	NetNS    string `json:"netns"`
	Procs    []Proc `json:"procs"`
	QEMU     int    `json:"qemu"`
	Loop     string `json:"loop"`
	LoopFile string `json:"loop_file"`
	Mount    string `json:"mount"`
}

// Proc is a process in the namespace.
type Proc struct {
	vmm.Handle
	Comm string `json:"comm"`
}
