package kernels_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/kernels/initramfs"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

// shared holds fixtures built once per test binary.
var shared struct {
	dir string

	initOnce sync.Once
	initPath string
	initErr  error

	debOnce sync.Once
	deb     model.Kernel
	debErr  error
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "banger-kernels-test-")
	if err != nil {
		panic(err)
	}
	shared.dir = dir
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// initBinary builds cmd/banger-init once.
func initBinary(t testing.TB) string {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		testutil.Missing(t, testutil.TierTools, "the go toolchain is needed to build cmd/banger-init")
	}
	shared.initOnce.Do(func() {
		shared.initPath = filepath.Join(shared.dir, "banger-init")
		shared.initErr = initramfs.BuildInit(context.Background(), shared.initPath)
	})
	if shared.initErr != nil {
		t.Fatalf("build banger-init: %v", shared.initErr)
	}
	return shared.initPath
}

// debianKernel imports the cached Debian cloud kernel package once.
func debianKernel(t testing.TB) model.Kernel {
	t.Helper()
	deb := testutil.DebianKernelDeb(t)
	testutil.RequiresTool(t, "depmod")
	ib := initBinary(t)
	shared.debOnce.Do(func() {
		shared.deb, shared.debErr = kernels.ImportDeb(context.Background(),
			filepath.Join(shared.dir, "kernels", "debian-cloud"), "debian-cloud", deb, kernels.DebOptions{InitBinary: ib})
	})
	if shared.debErr != nil {
		t.Fatalf("ImportDeb(%s): %v", deb, shared.debErr)
	}
	return shared.deb
}
