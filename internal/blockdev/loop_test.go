package blockdev_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

func sparseFile(t *testing.T, path string, size int64) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

// attach attaches a loop and makes sure it is detached when the test ends,
// whatever the code under test did.
func attach(t *testing.T, file string, ro bool) string {
	t.Helper()
	dev, err := blockdev.AttachLoop(context.Background(), file, ro)
	if err != nil {
		t.Fatalf("AttachLoop(%s): %v", file, err)
	}
	t.Cleanup(func() {
		if err := blockdev.DetachLoop(context.Background(), dev, file, filepath.Dir(filepath.Dir(file))); err != nil && !errors.Is(err, blockdev.ErrNotOurs) {
			t.Errorf("cleanup detach %s: %v", dev, err)
		}
	})
	return dev
}

func TestLoopAttachFindDetach(t *testing.T) {
	testutil.RequiresLoop(t)
	ctx := context.Background()
	state := t.TempDir()
	for _, ro := range []bool{false, true} {
		file := sparseFile(t, filepath.Join(state, "vms", fmt.Sprintf("vm-%v", ro), "cow.img"), 16<<20)
		dev := attach(t, file, ro)
		devs, err := blockdev.FindLoopsByBackingFile(file)
		if err != nil || len(devs) != 1 || devs[0] != dev {
			t.Fatalf("FindLoopsByBackingFile(%s) = %v, %v; want [%s]", file, devs, err, dev)
		}
		roFlag, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/ro")
		if err != nil || strings.TrimSpace(string(roFlag)) != map[bool]string{true: "1", false: "0"}[ro] {
			t.Errorf("%s ro = %q, %v; want read-only %v", dev, roFlag, err, ro)
		}
		for i := range 2 { // the second detach finds it unbound: success
			if err := blockdev.DetachLoop(ctx, dev, file, state); err != nil {
				t.Fatalf("DetachLoop #%d(%s): %v", i+1, dev, err)
			}
		}
		if devs, err := blockdev.FindLoopsByBackingFile(file); err != nil || len(devs) != 0 {
			t.Errorf("after detach FindLoopsByBackingFile = %v, %v; want none", devs, err)
		}
	}
}

func TestForeignLoopNeverDetached(t *testing.T) {
	testutil.RequiresLoop(t)
	ctx := context.Background()
	root := t.TempDir()
	state := filepath.Join(root, "banger")
	ours := sparseFile(t, filepath.Join(state, "vms", "vm1", "cow.img"), 16<<20)
	foreign := sparseFile(t, filepath.Join(root, "banger-evil", "x", "disk.img"), 16<<20)
	fdev := attach(t, foreign, false)
	odev := attach(t, ours, false)

	cases := []struct{ dev, expect string }{
		{fdev, foreign}, // backing outside the state dir
		{fdev, ours},    // record claims our file, device holds a foreign one
		{fdev, state + "/../banger-evil/x/disk.img"},            // path tricks
		{odev, filepath.Join(state, "vms", "vm1", "other.img")}, // ours, but not what the record says
	}
	for _, c := range cases {
		if err := blockdev.DetachLoop(ctx, c.dev, c.expect, state); !errors.Is(err, blockdev.ErrNotOurs) {
			t.Errorf("DetachLoop(%s, %s) = %v, want ErrNotOurs", c.dev, c.expect, err)
		}
	}
	m := &blockdev.Manager{StateDir: state}
	err := m.Teardown(ctx, blockdev.Disk{Driver: blockdev.DriverCopy, COWPath: foreign, Loops: []model.LoopDev{{Device: fdev, BackingFile: foreign}}})
	if !errors.Is(err, blockdev.ErrNotOurs) {
		t.Errorf("Teardown of a record naming a foreign loop = %v, want ErrNotOurs", err)
	}
	for _, c := range []struct{ dev, file string }{{fdev, foreign}, {odev, ours}} {
		if devs, _ := blockdev.FindLoopsByBackingFile(c.file); len(devs) != 1 || devs[0] != c.dev {
			t.Errorf("%s on %s did not survive: %v", c.dev, c.file, devs)
		}
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("foreign file removed: %v", err)
	}
}

func TestConcurrentAttach(t *testing.T) {
	testutil.RequiresLoop(t)
	state := t.TempDir()
	const n = 8
	devs := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		file := sparseFile(t, filepath.Join(state, "vms", fmt.Sprint(i), "cow.img"), 4<<20)
		wg.Go(func() {
			dev, err := blockdev.AttachLoop(context.Background(), file, false)
			if err != nil {
				t.Errorf("AttachLoop #%d: %v", i, err)
				return
			}
			devs[i] = dev
			t.Cleanup(func() { _ = blockdev.DetachLoop(context.Background(), dev, file, state) })
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for i, d := range devs {
		if d == "" || seen[d] {
			t.Errorf("attach #%d got %q; devices %v must be distinct", i, d, devs)
		}
		seen[d] = true
		file := filepath.Join(state, "vms", fmt.Sprint(i), "cow.img")
		if got, _ := blockdev.FindLoopsByBackingFile(file); len(got) != 1 || got[0] != d {
			t.Errorf("loop of %s = %v, want [%s]", file, got, d)
		}
	}
}
