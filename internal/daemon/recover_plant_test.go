package daemon_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/daemon"
	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/testutil"
)

// TestRecoveryIgnoresTmpPlants: a second uid (65534) plants in $TMPDIR what
// start-up recovery used to read before listening: a pull scratch dir whose
// owner file is a FIFO (the read hung the daemon) and one whose owner file
// is a symlink to /dev/zero (the read exhausted its memory). The daemon now
// starts at once, leaves the plants alone, and its own scratch dir is one
// the second uid cannot write.
func TestRecoveryIgnoresTmpPlants(t *testing.T) {
	testutil.RequiresRoot(t)
	cfg := daemontest.Dirs(t)
	// The planted names sort with the FIFO first: on a daemon that reads
	// them, the FIFO hangs the start before /dev/zero is reached.
	tmp := os.TempDir()
	suffix := filepath.Base(filepath.Dir(cfg.StateDir))
	fifoDir := filepath.Join(tmp, "banger-pull-a-"+suffix)
	zeroDir := filepath.Join(tmp, "banger-pull-b-"+suffix)
	t.Cleanup(func() { _ = os.RemoveAll(fifoDir); _ = os.RemoveAll(zeroDir) })
	plant := exec.Command("/bin/sh", "-c", `set -e
mkdir "$1" "$2"
mkfifo "$1/.banger-owner"
ln -s /dev/zero "$2/.banger-owner"`, "sh", fifoDir, zeroDir)
	plant.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if out, err := plant.CombinedOutput(); err != nil {
		t.Fatalf("planting as uid 65534: %v: %s", err, out)
	}

	type result struct {
		d   *daemon.Daemon
		err error
	}
	done := make(chan result, 1)
	go func() {
		d, err := daemon.New(context.Background(), daemon.Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		done <- result{d, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("daemon start with planted scratch dirs: %v", r.err)
		}
		ln, err := r.d.Listen()
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		served := make(chan error, 1)
		go func() { served <- r.d.Serve(ctx, ln) }()
		t.Cleanup(func() { cancel(); <-served })
	case <-time.After(20 * time.Second):
		t.Fatal("daemon start hangs on a FIFO planted in $TMPDIR by uid 65534")
	}
	for _, p := range []string{fifoDir + "/.banger-owner", zeroDir + "/.banger-owner"} {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("recovery touched another user's file %s: %v", p, err)
		}
	}

	// The daemon's own scratch dir: private, and closed to uid 65534.
	fi, err := os.Lstat(cfg.ScratchDir())
	if err != nil {
		t.Fatalf("scratch dir %s: %v", cfg.ScratchDir(), err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || fi.Mode().Perm()&0o077 != 0 {
		t.Fatalf("scratch dir %s: uid %d mode %v, want root and 0700", cfg.ScratchDir(), st.Uid, fi.Mode().Perm())
	}
	try := exec.Command("/bin/sh", "-c", `mkfifo "$1/pull-x/.banger-owner" || mkdir "$1/pull-x"`, "sh", cfg.ScratchDir())
	try.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if out, err := try.CombinedOutput(); err == nil {
		t.Fatalf("uid 65534 planted in the daemon's scratch dir %s: %s", cfg.ScratchDir(), out)
	}
}

// TestRecoveryEmptiesScratch: what a pull that died with the daemon left in
// <state>/tmp is removed at the next start; a symlink there is removed, not
// followed.
func TestRecoveryEmptiesScratch(t *testing.T) {
	cfg := daemontest.Dirs(t)
	outside := filepath.Join(t.TempDir(), "keep")
	if err := os.WriteFile(outside, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	left := filepath.Join(cfg.ScratchDir(), "pull-123", "rootfs", "etc")
	if err := os.MkdirAll(left, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Dir(outside), filepath.Join(cfg.ScratchDir(), "pull-link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(cfg.ScratchDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	s := daemontest.Start(t, func(c *config.Config) { *c = cfg })
	ents, err := os.ReadDir(s.Config.ScratchDir())
	if err != nil || len(ents) != 0 {
		t.Fatalf("scratch dir after start-up: %v, %v; want empty", ents, err)
	}
	if _, err := os.Stat(outside); err != nil {
		t.Fatalf("recovery followed a symlink in the scratch dir: %v", err)
	}
}
