// Package daemontest starts a real banger daemon in the test process, on a
// real Unix socket, with its state, cache and runtime dirs in temp dirs.
package daemontest

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/daemon"
)

// Started is a daemon running for one test.
type Started struct {
	D      *daemon.Daemon
	Config config.Config
	done   chan error
	cancel context.CancelFunc
	once   sync.Once
	err    error
}

func (s *Started) stop() error {
	s.once.Do(func() {
		s.cancel()
		select {
		case s.err = <-s.done:
		case <-time.After(15 * time.Second):
			s.err = errors.New("daemon did not stop within 15s")
		}
	})
	return s.err
}

// Stop shuts the daemon down and waits for it.
func (s *Started) Stop(t testing.TB) {
	t.Helper()
	if err := s.stop(); err != nil {
		t.Errorf("daemon Serve: %v", err)
	}
}

// Dirs returns a config whose dirs live in a fresh temp dir that other
// users can traverse (so tests may connect as a second uid).
func Dirs(t testing.TB) config.Config {
	t.Helper()
	base, err := os.MkdirTemp("", "banger-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := config.Defaults(0, "", "")
	cfg.StateDir = filepath.Join(base, "state")
	cfg.CacheDir = filepath.Join(base, "cache")
	cfg.RuntimeDir = filepath.Join(base, "run")
	cfg.Socket = filepath.Join(cfg.RuntimeDir, "banger.sock")
	cfg.SocketGroup = ""
	return cfg
}

// Start starts a daemon with Dirs(t) as its config, after mutate (may be
// nil) adjusts it. The daemon is stopped at the end of the test.
func Start(t testing.TB, mutate func(*config.Config)) *Started {
	t.Helper()
	cfg := Dirs(t)
	if mutate != nil {
		mutate(&cfg)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.New(ctx, daemon.Options{Config: cfg, Logger: log})
	if err != nil {
		cancel()
		t.Fatalf("daemon.New: %v", err)
	}
	ln, err := d.Listen()
	if err != nil {
		cancel()
		t.Fatalf("daemon Listen: %v", err)
	}
	s := &Started{D: d, Config: cfg, done: make(chan error, 1), cancel: cancel}
	go func() { s.done <- d.Serve(ctx, ln) }()
	t.Cleanup(func() { _ = s.stop() })
	return s
}
