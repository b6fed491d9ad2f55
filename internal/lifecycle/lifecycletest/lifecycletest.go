// Package lifecycletest holds what the tests of the VM lifecycle and of
// start-up recovery share: a real fake-Firecracker binary to run as the
// VM monitor, so that they need neither root nor a hypervisor.
package lifecycletest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/config"
)

var (
	fakeOnce sync.Once
	fakeBin  string
	fakeErr  error
)

// FakeFirecracker builds cmd/banger-fake-firecracker once per test binary
// and returns its path (or the one BANGER_FAKE_FIRECRACKER names, for a
// test binary run where no Go toolchain is at hand).
func FakeFirecracker(tb testing.TB) string {
	tb.Helper()
	fakeOnce.Do(func() {
		if p := os.Getenv("BANGER_FAKE_FIRECRACKER"); p != "" {
			fakeBin = p
			return
		}
		dir, err := os.MkdirTemp("", "banger-fake-fc-bin-")
		if err != nil {
			fakeErr = err
			return
		}
		fakeBin = filepath.Join(dir, "banger-fake-firecracker")
		_, file, _, _ := runtime.Caller(0)
		cmd := exec.Command("go", "build", "-o", fakeBin, "./cmd/banger-fake-firecracker")
		cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..", "..")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fakeErr = fmt.Errorf("go build banger-fake-firecracker: %w\n%s", err, out)
		}
	})
	if fakeErr != nil {
		tb.Fatal(fakeErr)
	}
	return fakeBin
}

var (
	jailerOnce sync.Once
	jailerBin  string
	jailerErr  error
)

// FakeJailer builds cmd/banger-fake-jailer once per test binary and
// returns its path.
func FakeJailer(tb testing.TB) string {
	tb.Helper()
	jailerOnce.Do(func() {
		dir, err := os.MkdirTemp("", "banger-fake-jailer-bin-")
		if err != nil {
			jailerErr = err
			return
		}
		jailerBin = filepath.Join(dir, "banger-fake-jailer")
		_, file, _, _ := runtime.Caller(0)
		cmd := exec.Command("go", "build", "-o", jailerBin, "./cmd/banger-fake-jailer")
		cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..", "..")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			jailerErr = fmt.Errorf("go build banger-fake-jailer: %w\n%s", err, out)
		}
	})
	if jailerErr != nil {
		tb.Fatal(jailerErr)
	}
	return jailerBin
}

// Config returns a configuration whose state, cache and runtime dirs live
// under base (made, with the VMs' dirs), whose Firecracker is the fake, and
// the path of a kernel file to name in specs (the fake does not boot it).
func Config(tb testing.TB, base string) (config.Config, string) {
	tb.Helper()
	cfg := config.Defaults(0, "", "")
	cfg.StateDir = filepath.Join(base, "state")
	cfg.CacheDir = filepath.Join(base, "cache")
	cfg.RuntimeDir = filepath.Join(base, "run")
	cfg.Socket = filepath.Join(cfg.RuntimeDir, "banger.sock")
	cfg.SocketGroup = ""
	cfg.FirecrackerBinary = FakeFirecracker(tb)
	for _, d := range []string{cfg.StateDir, cfg.VMsDir(), filepath.Join(cfg.RuntimeDir, "vms")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	kernel := filepath.Join(base, "vmlinux")
	if err := os.WriteFile(kernel, []byte("not a kernel"), 0o644); err != nil {
		tb.Fatal(err)
	}
	return cfg, kernel
}
