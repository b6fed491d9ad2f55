package firecracker_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fake"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

// The test binary doubles as the fake Firecracker: the backend under test
// starts os.Executable() with BANGER_FAKE_FIRECRACKER=1.
func TestMain(m *testing.M) {
	if os.Getenv("BANGER_FAKE_FIRECRACKER") == "1" {
		os.Exit(fake.Main(os.Args[1:]))
	}
	os.Exit(m.Run())
}

func fakeMonitor(t *testing.T) func() vmm.Monitor {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("BANGER_FAKE_FIRECRACKER", "1")
	return func() vmm.Monitor {
		m := firecracker.New()
		m.Binary = self
		m.Args = []string{"--agent-echo"}
		m.TermWait = 2 * time.Second
		return m
	}
}

func fakeSpec(t *testing.T) vmm.Spec {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	disk := filepath.Join(dir, "rootfs.img")
	for _, f := range []string{kernel, disk} {
		if err := os.WriteFile(f, []byte("not really"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return vmm.Spec{
		VMID: "01TEST", Name: "conformance", CPUs: 2, MemoryMiB: 256,
		Kernel: kernel, Cmdline: "console=ttyS0 reboot=k panic=1",
		Disk: disk, Tap: "bgr-test0", MAC: "06:00:0a:00:00:02",
		RuntimeDir: filepath.Join(dir, "run"), ConsoleLog: filepath.Join(dir, "console.log"),
	}
}

// TestConformanceFake runs the shared suite against the Firecracker backend
// driving the fake Firecracker (no root, no KVM needed).
func TestConformanceFake(t *testing.T) {
	vmmtest.RunConfig(t, vmmtest.Config{
		New:          fakeMonitor(t),
		Spec:         fakeSpec,
		WantGraceful: true, // the fake honours SendCtrlAltDel
		Graceful:     5 * time.Second,
		Continued:    sameFakeBoot,
	})
}

func TestStartSurfacesAPIFault(t *testing.T) {
	m := fakeMonitor(t)()
	spec := fakeSpec(t)
	spec.Disk = filepath.Join(t.TempDir(), "missing.img")
	h, err := m.Start(t.Context(), spec)
	if err == nil {
		_, _ = m.Stop(t.Context(), h, 0)
		t.Fatal("Start with a missing disk succeeded")
	}
	var apiErr *firecracker.APIError
	if !asAPIError(err, &apiErr) || apiErr.Path != "/drives/rootfs" {
		t.Fatalf("Start error = %v, want an APIError for /drives/rootfs", err)
	}
}

// TestFakeServesRealAgent boots the fake with --agent-root and reaches
// banger's real guest agent through the vsock socket, as the daemon does.
func TestFakeServesRealAgent(t *testing.T) {
	newMonitor := fakeMonitor(t)
	m := newMonitor().(*firecracker.Monitor)
	m.Args = []string{"--agent-root", t.TempDir()}
	spec := fakeSpec(t)
	h, err := m.Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, agent.Transport(h.AgentTransport), h.AgentSocket)
	if err != nil {
		t.Fatalf("agent.Dial(%s, %s): %v", h.AgentTransport, h.AgentSocket, err)
	}
	defer c.Close()
	health, err := c.Health(ctx)
	if err != nil {
		t.Fatalf("Health: %v", err)
	}
	t.Logf("agent health through the fake: %+v", health)
	// No listener on other ports: Firecracker closes without "OK".
	conn, err := agent.ConnectVsockUDS(ctx, h.AgentSocket, agent.DefaultPort+1)
	if err == nil {
		conn.Close()
		t.Fatal("CONNECT to a port without a listener succeeded")
	}
}

// TestStartThroughExecWrapper starts the monitor through a wrapper that
// execs it (as the jailer or `ip netns exec` would): the handle must name
// the final program, so Alive and Stop still recognise it.
func TestStartThroughExecWrapper(t *testing.T) {
	newMonitor := fakeMonitor(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	wrapper := filepath.Join(t.TempDir(), "wrap.sh")
	script := "#!/bin/sh\nexec \"$BANGER_FAKE_SELF\" \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o700); err != nil { //nolint:gosec // executable test script
		t.Fatal(err)
	}
	t.Setenv("BANGER_FAKE_SELF", self)
	m := newMonitor().(*firecracker.Monitor)
	m.Binary = wrapper
	h, err := m.Start(t.Context(), fakeSpec(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })
	if h.Cmdline[0] != self {
		t.Errorf("handle argv[0] = %q, want the exec'd program %q", h.Cmdline[0], self)
	}
	if alive, err := m.Alive(h); !alive || err != nil {
		t.Fatalf("Alive = %v, %v", alive, err)
	}
	if how, err := m.Stop(t.Context(), h, 5*time.Second); err != nil || how != vmm.StoppedGraceful {
		t.Fatalf("Stop = %q, %v; want graceful", how, err)
	}
}

// sameFakeBoot checks that the restored fake guest names the boot of the
// saved one: its "memory" (the memory file) came from the snapshot.
func sameFakeBoot(t *testing.T, saved, restored vmm.Spec) {
	t.Helper()
	id := func(log, prefix string) string {
		b, _ := os.ReadFile(log) //nolint:gosec // test log
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, prefix); ok {
				id, _, _ := strings.Cut(rest, " ")
				return id
			}
		}
		return ""
	}
	boot, back := id(saved.ConsoleLog, fake.BootIDLine), id(restored.ConsoleLog, fake.RestoredLine)
	if boot == "" || back != boot {
		t.Errorf("restored guest names boot %q, the saved guest booted as %q", back, boot)
	}
}
