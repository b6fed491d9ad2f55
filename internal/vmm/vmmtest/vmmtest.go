// Package vmmtest is the conformance suite every vmm.Monitor backend passes:
// start, identity checks against reused pids, reattach from a fresh Monitor
// (as after a daemon restart), graceful and idempotent stop, an externally
// killed monitor, and a failed start that leaves nothing behind.
//
// It also builds the small guests the QEMU tests boot: the Debian cloud
// kernel from the cached .deb, and a busybox initramfs (see guest.go).
package vmmtest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
)

// Config describes the backend under test.
type Config struct {
	// New returns a fresh Monitor; the suite calls it again to play a
	// restarted daemon.
	New func() vmm.Monitor
	// Spec returns a valid spec with a fresh RuntimeDir for each call.
	Spec func(t *testing.T) vmm.Spec
	// Ready, when set, waits until the guest can honour a graceful stop
	// (for example a line on its console).
	Ready func(t *testing.T, spec vmm.Spec, h vmm.Handle)
	// WantGraceful requires the graceful stop to end by the guest shutting
	// down (vmm.StoppedGraceful) rather than by a fallback.
	WantGraceful bool
	// Graceful is the graceful-stop budget; 0 means 20 s.
	Graceful time.Duration
	// Continued, when set, checks that the guest restored from a snapshot
	// carries on from the saved one (saved and restored are their specs):
	// for example a counter on the console that goes on.
	Continued func(t *testing.T, saved, restored vmm.Spec)
	// NoSnapshot, when set, says why this configuration of the backend
	// takes no snapshots (the Snapshot case is then unsupported).
	NoSnapshot string
}

// Run runs the suite with newMonitor and specFor and default settings.
func Run(t *testing.T, newMonitor func() vmm.Monitor, specFor func(t *testing.T) vmm.Spec) {
	RunConfig(t, Config{New: newMonitor, Spec: specFor})
}

// RunConfig runs the suite.
func RunConfig(t *testing.T, cfg Config) {
	if cfg.Graceful == 0 {
		cfg.Graceful = 20 * time.Second
	}
	t.Run("Lifecycle", func(t *testing.T) { testLifecycle(t, cfg) })
	t.Run("KilledExternally", func(t *testing.T) { testKilled(t, cfg) })
	t.Run("FailedStartLeavesNothing", func(t *testing.T) { testFailedStart(t, cfg) })
	t.Run("Snapshot", func(t *testing.T) { testSnapshot(t, cfg) })
}

func startVM(t *testing.T, cfg Config, m vmm.Monitor, spec vmm.Spec) vmm.Handle {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	begin := time.Now()
	h, err := m.Start(ctx, spec)
	if err != nil {
		t.Fatalf("%s Start(%q): %v\nconsole:\n%s", m.Name(), spec.Name, err, tail(spec.ConsoleLog))
	}
	t.Logf("%s Start took %v (pid %d, transport %s)", m.Name(), time.Since(begin).Round(time.Millisecond), h.PID, h.AgentTransport)
	t.Cleanup(func() {
		// Never leave a VM behind, whatever failed.
		if _, err := cfg.New().Stop(context.Background(), h, 0); err != nil {
			t.Errorf("cleanup Stop: %v", err)
		}
	})
	return h
}

func testLifecycle(t *testing.T, cfg Config) {
	m := cfg.New()
	spec := cfg.Spec(t)
	h := startVM(t, cfg, m, spec)

	boot, err := vmm.BootID()
	if err != nil {
		t.Fatal(err)
	}
	if h.PID <= 0 || h.PIDStart == 0 || h.BootID != boot || len(h.Cmdline) == 0 {
		t.Fatalf("handle identity incomplete: %+v (boot id now %s)", h, boot)
	}
	if !isSocket(h.APISocket) {
		t.Errorf("API socket %q is not a socket", h.APISocket)
	}
	if !slices.Contains([]string{vmm.TransportVsockUDS, vmm.TransportVsock, vmm.TransportVirtioSerial}, h.AgentTransport) {
		t.Errorf("AgentTransport = %q, want one of the vmm.Transport* values", h.AgentTransport)
	}
	mustAlive(t, m, h, true, "the started VM")
	checkAgentChannel(t, h)

	// A handle whose pid was reused by another process must never be
	// treated as the VM: not alive, not signalled, not reattached.
	for name, bad := range tampered(h) {
		mustAlive(t, m, bad, false, "handle with "+name)
		how, err := cfg.New().Stop(context.Background(), bad, time.Second)
		if err != nil || how != vmm.StoppedAlready {
			t.Errorf("Stop(handle with %s) = %q, %v; want %q, nil", name, how, err, vmm.StoppedAlready)
		}
		if err := cfg.New().Reattach(context.Background(), bad); !errors.Is(err, vmm.ErrNotRunning) {
			t.Errorf("Reattach(handle with %s) = %v, want ErrNotRunning", name, err)
		}
	}
	mustAlive(t, m, h, true, "the VM after stops on tampered handles")

	// A restarted daemon has only the persisted handle.
	m2 := cfg.New()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m2.Reattach(ctx, h); err != nil {
		t.Fatalf("Reattach from a fresh %s monitor: %v", m2.Name(), err)
	}
	mustAlive(t, m2, h, true, "the VM seen by a fresh monitor")

	if cfg.Ready != nil {
		cfg.Ready(t, spec, h)
	}
	begin := time.Now()
	how, err := m2.Stop(context.Background(), h, cfg.Graceful)
	took := time.Since(begin)
	if err != nil {
		t.Fatalf("Stop(graceful %v): %v", cfg.Graceful, err)
	}
	t.Logf("graceful Stop ended by %q after %v", how, took.Round(time.Millisecond))
	switch {
	case cfg.WantGraceful && how != vmm.StoppedGraceful:
		t.Errorf("Stop = %q, want %q", how, vmm.StoppedGraceful)
	case how != vmm.StoppedGraceful && how != vmm.StoppedQuit:
		t.Errorf("Stop = %q, want %q or %q (not a signal)", how, vmm.StoppedGraceful, vmm.StoppedQuit)
	}
	mustAlive(t, m, h, false, "the stopped VM")
	mustBeGone(t, h)
	if isSocket(h.APISocket) {
		t.Errorf("API socket %s left behind after Stop", h.APISocket)
	}

	how, err = m.Stop(context.Background(), h, cfg.Graceful)
	if err != nil || how != vmm.StoppedAlready {
		t.Errorf("second Stop = %q, %v; want %q, nil", how, err, vmm.StoppedAlready)
	}
	if err := cfg.New().Reattach(context.Background(), h); !errors.Is(err, vmm.ErrNotRunning) {
		t.Errorf("Reattach after Stop = %v, want ErrNotRunning", err)
	}
}

func testKilled(t *testing.T, cfg Config) {
	m := cfg.New()
	spec := cfg.Spec(t)
	h := startVM(t, cfg, m, spec)
	if err := syscall.Kill(h.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill %d: %v", h.PID, err)
	}
	if !vmm.WaitGone(context.Background(), h, 10*time.Second) {
		t.Fatalf("Alive still true 10s after SIGKILL of pid %d", h.PID)
	}
	mustAlive(t, cfg.New(), h, false, "the killed VM")
	if how, err := cfg.New().Stop(context.Background(), h, time.Second); err != nil || how != vmm.StoppedAlready {
		t.Errorf("Stop after external kill = %q, %v; want %q, nil", how, err, vmm.StoppedAlready)
	}
	// The stale sockets of the crashed run must not prevent a new start.
	h2 := startVM(t, cfg, m, spec)
	mustAlive(t, m, h2, true, "the VM restarted after a crash")
	how, err := m.Stop(context.Background(), h2, 0)
	if err != nil {
		t.Fatalf("Stop(no grace): %v", err)
	}
	if how != vmm.StoppedTerm && how != vmm.StoppedKill && how != vmm.StoppedQuit {
		t.Errorf("Stop without grace = %q, want quit, sigterm or sigkill", how)
	}
	mustBeGone(t, h2)
}

func testFailedStart(t *testing.T, cfg Config) {
	m := cfg.New()
	spec := cfg.Spec(t)
	spec.Kernel = filepath.Join(spec.RuntimeDir, "no-such-kernel")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	h, err := m.Start(ctx, spec)
	if err == nil {
		_, _ = m.Stop(context.Background(), h, 0)
		t.Fatalf("Start with a missing kernel succeeded")
	}
	t.Logf("Start with a missing kernel: %v", err)
	if pids := processesMentioning(spec.RuntimeDir); len(pids) > 0 {
		t.Errorf("processes left after a failed Start: %v", pids)
	}
	entries, _ := os.ReadDir(spec.RuntimeDir)
	for _, e := range entries {
		if e.Type() == fs.ModeSocket {
			t.Errorf("socket %s left after a failed Start", e.Name())
		}
	}
}

// tampered returns copies of h that no longer describe its process.
func tampered(h vmm.Handle) map[string]vmm.Handle {
	out := map[string]vmm.Handle{}
	a := h
	a.PIDStart++
	out["another start time"] = a
	b := h
	b.BootID = "00000000-0000-0000-0000-000000000000"
	out["another boot id"] = b
	c := h
	c.Cmdline = append(slices.Clone(h.Cmdline), "--other")
	out["another command line"] = c
	d := h
	d.PID = os.Getpid() // a live process that is not the VM
	out["the pid of another live process"] = d
	return out
}

func mustAlive(t *testing.T, m vmm.Monitor, h vmm.Handle, want bool, what string) {
	t.Helper()
	got, err := m.Alive(h)
	if err != nil || got != want {
		t.Fatalf("Alive(%s, pid %d) = %v, %v; want %v", what, h.PID, got, err, want)
	}
}

// mustBeGone checks the process is gone from /proc (reaped, not a zombie)
// or that its pid now names another process.
func mustBeGone(t *testing.T, h vmm.Handle) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(h.PID) + "/stat")
		if errors.Is(err, fs.ErrNotExist) {
			return
		}
		if err == nil && !strings.Contains(string(b), " "+strconv.FormatUint(h.PIDStart, 10)+" ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still in /proc 5s after Stop: %s", h.PID, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func checkAgentChannel(t *testing.T, h vmm.Handle) {
	t.Helper()
	switch h.AgentTransport {
	case vmm.TransportVsock:
		t.Logf("agent channel is AF_VSOCK CID %d: nothing to dial on the host without a guest agent", h.AgentCID)
		return
	case vmm.TransportVsockUDS, vmm.TransportVirtioSerial:
	default:
		t.Fatalf("unknown agent transport %q", h.AgentTransport)
	}
	if h.AgentSocket == "" {
		t.Fatalf("transport %s without an agent socket", h.AgentTransport)
	}
	var c net.Conn
	var err error
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err = net.Dial("unix", h.AgentSocket)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("agent socket %s: %v", h.AgentSocket, err)
	}
	defer c.Close()
	if h.AgentTransport != vmm.TransportVsockUDS {
		return
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "CONNECT 1024\n"); err != nil {
		t.Fatalf("vsock CONNECT: %v", err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "OK ") {
		t.Fatalf("vsock CONNECT 1024 answered %q, %v; want OK <port>", line, err)
	}
}

func isSocket(path string) bool {
	fi, err := os.Lstat(path)
	return err == nil && fi.Mode().Type() == fs.ModeSocket
}

// processesMentioning lists pids whose command line contains s.
func processesMentioning(s string) []int {
	var pids []int
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + d.Name() + "/cmdline")
		if err == nil && strings.Contains(string(b), s) {
			if st, err := os.ReadFile("/proc/" + d.Name() + "/stat"); err == nil {
				if i := strings.LastIndexByte(string(st), ')'); i > 0 && strings.HasPrefix(string(st[i+1:]), " Z") {
					continue // exited, waiting for its reaper
				}
			}
			pids = append(pids, pid)
		}
	}
	return pids
}

// tail returns the last lines of a console log, for failure messages.
func tail(path string) string {
	b, err := os.ReadFile(path) //nolint:gosec // test log
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}
