package e2etest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// Binaries builds banger, the guest agent, banger-init and the fake
// Firecracker once per test binary and returns the directory holding them
// (inside the run directory, so it goes with the run).
func Binaries(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			binErr = err
			return
		}
		binDir, binErr = os.MkdirTemp("", "bin-")
		if binErr != nil {
			return
		}
		for _, b := range []struct{ out, pkg string }{
			{"banger", "./cmd/banger"},
			{"banger-vsock-agent", "./cmd/banger-vsock-agent"},
			{"banger-init", "./cmd/banger-init"},
			{"banger-fake-firecracker", "./cmd/banger-fake-firecracker"},
		} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, b.out), b.pkg)
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := CombinedOutput(cmd); err != nil {
				binErr = fmt.Errorf("go build %s: %w\n%s", b.pkg, err, out)
				return
			}
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binDir
}

// RepoRoot returns the repository's top directory: the nearest parent of
// the working directory (the test's package directory) holding go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Daemon is a banger daemon process running inside a namespace, with its
// state, cache and runtime dirs in a directory of its own. Its methods
// report to the test that made it; For gives a view reporting to a subtest.
type Daemon struct {
	t testing.TB
	*daemonProc
}

// daemonProc is what every view of one daemon shares.
type daemonProc struct {
	ns      *NetNS
	Bin     string // the banger binary
	Dir     string
	Config  map[string]any
	Socket  string
	LogPath string
	cmd     *exec.Cmd
	sshDir  string
}

// For returns a view of the same daemon whose failures are reported to t:
// use it in a subtest (t.Run) that shares the parent's daemon, since a
// test may only fail from its own goroutine.
func (d *Daemon) For(t testing.TB) *Daemon { return &Daemon{t: t, daemonProc: d.daemonProc} }

// NewDaemon starts a daemon in ns with the harness's default config (QEMU,
// the built agent and init) plus extra; it is stopped, and its log tail
// printed if the test failed, when the test ends.
func NewDaemon(t testing.TB, ns *NetNS, extra map[string]any) *Daemon {
	t.Helper()
	bins := Binaries(t)
	// A short name: unix socket paths under it must stay within 108 bytes.
	base, err := os.MkdirTemp("", "d")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	d := &Daemon{t: t, daemonProc: &daemonProc{ns: ns, Bin: filepath.Join(bins, "banger"), Dir: base, LogPath: filepath.Join(base, "daemon.log"), sshDir: filepath.Join(base, "ssh")}}
	d.Socket = filepath.Join(base, "run", "banger.sock")
	d.Config = map[string]any{
		"state_dir":       filepath.Join(base, "state"),
		"cache_dir":       filepath.Join(base, "cache"),
		"runtime_dir":     filepath.Join(base, "run"),
		"socket":          d.Socket,
		"agent_binary":    filepath.Join(bins, "banger-vsock-agent"),
		"init_binary":     filepath.Join(bins, "banger-init"),
		"vmm":             "qemu",
		"healthy_timeout": "8m",
	}
	for k, v := range extra {
		d.Config[k] = v
	}
	d.Start()
	t.Cleanup(func() {
		d.Stop()
		if t.Failed() {
			b, _ := os.ReadFile(d.LogPath)
			t.Logf("daemon log:\n%s", Tail(string(b), 80))
			d.logConsoles(t)
		}
	})
	return d
}

// logConsoles logs the tail of every VM's serial console log left in the
// state dir, so that a failed boot shows what the guest printed.
func (d *Daemon) logConsoles(t testing.TB) {
	logs, _ := filepath.Glob(filepath.Join(d.StateDir(), "vms", "*", "console.log"))
	for _, l := range logs {
		b, err := os.ReadFile(l)
		if err != nil {
			continue
		}
		t.Logf("console log %s:\n%s", l, Tail(strings.ToValidUTF8(string(b), "?"), 60))
	}
}

// Tail returns the last n lines of s.
func Tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// StateDir is the daemon's state_dir.
func (d *Daemon) StateDir() string { return d.Config["state_dir"].(string) }

// SSHDir is the BANGER_SSH_DIR the CLI runs with (its key, pinned host
// keys).
func (d *Daemon) SSHDir() string { return d.sshDir }

// RuntimeDir is the daemon's runtime_dir.
func (d *Daemon) RuntimeDir() string { return d.Config["runtime_dir"].(string) }

// Start starts the daemon process and waits for its socket.
func (d *Daemon) Start() { d.StartEnv(nil) }

// StartEnv starts the daemon with extra environment variables (failpoints,
// a simulated boot id) on top of the test's.
func (d *Daemon) StartEnv(env map[string]string) {
	t := d.t
	t.Helper()
	raw, _ := json.MarshalIndent(d.Config, "", "  ")
	cfg := filepath.Join(d.Dir, "config.json")
	if err := os.WriteFile(cfg, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(d.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	d.cmd = d.ns.Cmd(d.Bin, "daemon", "--config", cfg, "--log-level", "debug")
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	d.cmd.Env = os.Environ()
	for k, v := range env {
		d.cmd.Env = append(d.cmd.Env, k+"="+v)
	}
	if err := Start(d.cmd); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", d.Socket); err == nil {
			_ = c.Close()
			return
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(d.LogPath)
			t.Fatalf("daemon did not come up:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop stops the daemon with SIGTERM (VMs keep running).
func (d *Daemon) Stop() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		_ = d.cmd.Process.Kill()
		<-done
	}
	d.cmd = nil
}

// Kill kills the daemon with SIGKILL.
func (d *Daemon) Kill() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Kill()
	_ = d.cmd.Wait()
	d.cmd = nil
}

// Log returns the daemon's log so far.
func (d *Daemon) Log() string {
	d.t.Helper()
	b, err := os.ReadFile(d.LogPath)
	if err != nil {
		d.t.Fatal(err)
	}
	return string(b)
}

// Result is what a CLI run printed.
type Result struct {
	Stdout, Stderr string
	Code           int
}

// CLI runs the banger CLI inside the namespace against the daemon; ctx's
// end kills it.
func (d *Daemon) CLI(ctx context.Context, args ...string) Result {
	cmd := d.ns.Cmd(d.Bin, append([]string{"--socket", d.Socket}, args...)...)
	cmd.Env = append(os.Environ(), "BANGER_SSH_DIR="+d.sshDir)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := Start(cmd); err != nil {
		d.t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		err = <-done
	}
	code := 0
	if err != nil {
		code = -1
		if ee, ok := err.(*exec.ExitError); ok { //nolint:errorlint
			code = ee.ExitCode()
		}
	}
	return Result{Stdout: out.String(), Stderr: errb.String(), Code: code}
}

// MustCLI runs the CLI and fails the test on a non-zero exit.
func (d *Daemon) MustCLI(ctx context.Context, args ...string) string {
	d.t.Helper()
	start := time.Now()
	r := d.CLI(ctx, args...)
	d.t.Logf("banger %s (%s)", strings.Join(args, " "), time.Since(start).Round(100*time.Millisecond))
	if r.Code != 0 {
		d.t.Fatalf("banger %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.Code, r.Stdout, Tail(r.Stderr, 40))
	}
	return r.Stdout
}

// JSON runs the CLI with -o json and decodes the output into v.
func (d *Daemon) JSON(ctx context.Context, v any, args ...string) {
	d.t.Helper()
	out := d.MustCLI(ctx, append(args, "-o", "json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		d.t.Fatalf("banger %v -o json: %v\n%s", args, err, out)
	}
}
