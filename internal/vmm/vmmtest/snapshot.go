package vmmtest

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
)

// testSnapshot saves a running VM, checks that a failed snapshot leaves it
// running with no files, restores the state into a fresh VM (another
// runtime dir, disk and console), and checks that a truncated state file
// is refused with nothing left behind.
func testSnapshot(t *testing.T, cfg Config) {
	if cfg.NoSnapshot != "" {
		testutil.Unsupported(t, cfg.NoSnapshot)
	}
	m := cfg.New()
	sn, ok := m.(vmm.Snapshotter)
	if !ok {
		testutil.Unsupported(t, m.Name()+" does not implement vmm.Snapshotter (an optional capability)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	spec := cfg.Spec(t)
	h := startVM(t, cfg, m, spec)
	if cfg.Ready != nil {
		cfg.Ready(t, spec, h)
	}

	// A failure while paused: no files, and the guest runs on.
	failDir := t.TempDir()
	errCopy := errors.New("disk copy failed (test)")
	_, err := sn.Snapshot(ctx, h, vmm.SnapshotRequest{Dir: failDir, WhilePaused: func(context.Context) error { return errCopy }})
	if !errors.Is(err, errCopy) {
		t.Fatalf("Snapshot with a failing WhilePaused = %v, want it to wrap %v", err, errCopy)
	}
	if left := entries(t, failDir); len(left) > 0 {
		t.Errorf("files left after a failed snapshot: %v", left)
	}
	mustAlive(t, m, h, true, "the VM after a failed snapshot")
	if err := cfg.New().Reattach(ctx, h); err != nil {
		t.Fatalf("Reattach after a failed snapshot: %v", err)
	}

	dir := t.TempDir()
	var pausedCalls int
	begin := time.Now()
	res, err := sn.Snapshot(ctx, h, vmm.SnapshotRequest{Dir: dir, WhilePaused: func(context.Context) error {
		pausedCalls++
		if alive, err := m.Alive(h); !alive || err != nil {
			t.Errorf("Alive during the pause = %v, %v", alive, err)
		}
		return nil
	}})
	if err != nil {
		t.Fatalf("Snapshot: %v\nconsole:\n%s", err, tail(spec.ConsoleLog))
	}
	t.Logf("%s Snapshot took %v, pause %v, files %v, version %q, accel %q", m.Name(), time.Since(begin).Round(time.Millisecond), res.Pause, res.Files, res.Version, res.Accel)
	if pausedCalls != 1 {
		t.Errorf("WhilePaused ran %d times, want 1", pausedCalls)
	}
	if res.Pause <= 0 || res.Pause > time.Since(begin) {
		t.Errorf("Pause = %v, want within (0, %v]", res.Pause, time.Since(begin))
	}
	if len(res.Files) == 0 {
		t.Fatal("Snapshot reported no state files")
	}
	for _, f := range res.Files {
		if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || fi.Size() == 0 {
			t.Errorf("state file %s: %v (size %d), want a non-empty file", f, err, size(fi))
		}
	}
	if res.Accel != "kvm" && res.Accel != "tcg" {
		t.Errorf("Accel = %q, want kvm or tcg", res.Accel)
	}
	if v, err := sn.Version(ctx); err != nil || v != res.Version || v == "" {
		t.Errorf("Version() = %q, %v; want the snapshot's %q", v, err, res.Version)
	}
	mustAlive(t, m, h, true, "the VM after its snapshot")
	if err := cfg.New().Reattach(ctx, h); err != nil {
		t.Fatalf("Reattach after Snapshot: %v", err)
	}
	if err := sn.Resume(ctx, h); err != nil {
		t.Errorf("Resume of a running VM: %v", err)
	}
	if _, err := m.Stop(ctx, h, 0); err != nil {
		t.Fatalf("Stop the saved VM: %v", err)
	}

	// A truncated state file is refused, and nothing is left running.
	bad := t.TempDir()
	for _, f := range res.Files {
		b, err := os.ReadFile(filepath.Join(dir, f)) //nolint:gosec // test files
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(bad, f), b[:len(b)/2], 0o600); err != nil { //nolint:gosec // test files named by the backend
			t.Fatal(err)
		}
	}
	badSpec := cfg.Spec(t)
	if h, err := sn.Restore(ctx, badSpec, bad); err == nil {
		_, _ = m.Stop(ctx, h, 0)
		t.Errorf("Restore from truncated state files succeeded")
	} else {
		t.Logf("Restore from truncated state: %v", err)
	}
	if pids := processesMentioning(badSpec.RuntimeDir); len(pids) > 0 {
		t.Errorf("processes left after a failed Restore: %v", pids)
	}
	for _, e := range entries(t, badSpec.RuntimeDir) {
		if fi, err := os.Lstat(filepath.Join(badSpec.RuntimeDir, e)); err == nil && fi.Mode().Type() == fs.ModeSocket {
			t.Errorf("socket %s left after a failed Restore", e)
		}
	}

	// The restore: a fresh VM that carries on where the saved one was.
	spec2 := cfg.Spec(t)
	begin = time.Now()
	h2, err := sn.Restore(ctx, spec2, dir)
	if err != nil {
		t.Fatalf("Restore: %v\nconsole:\n%s", err, tail(spec2.ConsoleLog))
	}
	t.Logf("%s Restore took %v (pid %d)", m.Name(), time.Since(begin).Round(time.Millisecond), h2.PID)
	t.Cleanup(func() { _, _ = cfg.New().Stop(context.Background(), h2, 0) })
	mustAlive(t, m, h2, true, "the restored VM")
	if err := cfg.New().Reattach(ctx, h2); err != nil {
		t.Fatalf("Reattach the restored VM: %v", err)
	}
	checkAgentChannel(t, h2)
	if cfg.Continued != nil {
		cfg.Continued(t, spec, spec2)
	}

	// A snapshot that keeps the guest paused, then Resume (what reconcile
	// does after a crash in the middle of a snapshot).
	res, err = sn.Snapshot(ctx, h2, vmm.SnapshotRequest{Dir: t.TempDir(), KeepPaused: true})
	if err != nil {
		t.Fatalf("Snapshot(KeepPaused): %v", err)
	}
	if err := sn.Resume(ctx, h2); err != nil {
		t.Fatalf("Resume after Snapshot(KeepPaused): %v", err)
	}
	how, err := m.Stop(ctx, h2, cfg.Graceful)
	if err != nil {
		t.Fatalf("Stop the restored VM: %v", err)
	}
	if cfg.WantGraceful && how != vmm.StoppedGraceful {
		t.Errorf("Stop of the restored, resumed VM = %q, want %q (the guest should be running)", how, vmm.StoppedGraceful)
	}
}

func entries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

func size(fi os.FileInfo) int64 {
	if fi == nil {
		return -1
	}
	return fi.Size()
}
