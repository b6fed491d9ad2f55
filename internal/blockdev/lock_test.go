package blockdev_test

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/privdir"
	"github.com/bangerdev/banger/internal/testutil"
)

const nobody = 65534

// asNobody returns a command that runs a shell script as uid/gid 65534.
func asNobody(script string) *exec.Cmd {
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	return cmd
}

// takeLock runs AttachLoop on a missing file: it takes the blockdev lock
// first, so the error says whether the lock was taken (then the file is
// missing) or refused.
func takeLock(ctx context.Context) error {
	_, err := blockdev.AttachLoop(ctx, "/nonexistent/banger-lock-test", true)
	return err
}

func withLockPath(t *testing.T, path string) {
	t.Helper()
	prev := blockdev.LockPath
	blockdev.LockPath = path
	t.Cleanup(func() { blockdev.LockPath = prev })
}

// TestLockDirNotReachableByOtherUsers: with the default lock path, a second
// uid can neither plant a file beside the lock nor open the lock to hold
// it (under /run/lock it could do both and hang every VM operation).
func TestLockDirNotReachableByOtherUsers(t *testing.T) {
	testutil.RequiresRoot(t)
	if err := takeLock(context.Background()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("taking the default lock %s: %v, want the lock taken and the missing file reported", blockdev.LockPath, err)
	}
	plant := filepath.Join(filepath.Dir(blockdev.LockPath), "planted-by-65534")
	t.Cleanup(func() { _ = os.Remove(plant) })
	for _, script := range []string{
		": > " + plant,
		"ln -s /etc/shadow " + plant,
		"flock -n " + blockdev.LockPath + " true",
	} {
		if out, err := asNobody(script).CombinedOutput(); err == nil {
			t.Errorf("uid %d ran %q beside the blockdev lock: succeeded (%s)", nobody, script, out)
		}
	}
}

// TestLockRefusesPlants: a symlink at the lock path, or a lock dir another
// user can write (with that user holding the lock), is refused at once, and
// nothing is created through the symlink.
func TestLockRefusesPlants(t *testing.T) {
	testutil.RequiresRoot(t)
	t.Run("symlink", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "locks")
		if err := privdir.Ensure(dir); err != nil {
			t.Fatal(err)
		}
		target := filepath.Join(t.TempDir(), "created-through-link")
		if err := os.Symlink(target, filepath.Join(dir, "blockdev.lock")); err != nil {
			t.Fatal(err)
		}
		withLockPath(t, filepath.Join(dir, "blockdev.lock"))
		if err := takeLock(context.Background()); !errors.Is(err, privdir.ErrUnsafe) {
			t.Fatalf("lock through a planted symlink: %v, want ErrUnsafe", err)
		}
		if _, err := os.Lstat(target); err == nil {
			t.Fatalf("the lock created %s through the planted symlink", target)
		}
	})
	t.Run("held by another uid", func(t *testing.T) {
		base, err := os.MkdirTemp("", "blockdev-lock-test-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(base) })
		dir := filepath.Join(base, "locks")
		if err := os.Mkdir(dir, 0o1777); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(base, 0o755); err != nil { //nolint:gosec // reachable by the planter
			t.Fatal(err)
		}
		if err := os.Chmod(dir, 0o1777); err != nil { //nolint:gosec // the plant: a /run/lock-like dir
			t.Fatal(err)
		}
		lockPath := filepath.Join(dir, "blockdev.lock")
		holder := asNobody("exec flock " + lockPath + " -c 'echo held; sleep 60'")
		out, err := holder.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := holder.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })
		if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "held\n" {
			t.Fatalf("uid %d taking the planted lock: %q, %v", nobody, line, err)
		}
		withLockPath(t, lockPath)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		start := time.Now()
		err = takeLock(ctx)
		if !errors.Is(err, privdir.ErrUnsafe) {
			t.Fatalf("lock in a world-writable dir held by uid %d: %v after %v, want ErrUnsafe at once", nobody, err, time.Since(start).Round(time.Millisecond))
		}
	})
}
