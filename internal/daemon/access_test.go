package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/lifecycle/lifecycletest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
)

// TestAccessRelay drives the daemon's relay (access.go) in process, through
// its real Unix socket, to a real guest agent: the VM is a running
// banger-fake-firecracker (a real process serving the Firecracker API and
// banger's agent on its vsock socket; no guest boots, so no tap or disk),
// recorded as uid 65533's and re-adopted when the daemon starts. Callers
// connect as real uids (SO_PEERCRED): the owner and root may exec, cp and
// ssh; uid 65534 gets "not found" for each, as for the VM's other calls. An
// exec whose agent dies mid-stream (the monitor is SIGKILLed) ends for the
// client with the session lost, promptly, the daemon keeps serving, and
// the VM is no longer running.
func TestAccessRelay(t *testing.T) {
	testutil.RequiresRoot(t)
	cfg := daemontest.Dirs(t)
	fakeCfg, kernel := lifecycletest.Config(t, filepath.Dir(cfg.StateDir))
	cfg.FirecrackerBinary = fakeCfg.FirecrackerBinary
	agentRoot := t.TempDir()
	cfg.VMM, cfg.FirecrackerWithoutKVM, cfg.ReadyCheck, cfg.DiskDriver = "firecracker", true, "agent", "copy"
	cfg.FirecrackerArgs = []string{"--agent-root", agentRoot}

	// A VM of uid 65533 whose monitor runs, as a daemon that died left it.
	id := model.NewID()
	m := firecracker.New()
	m.Binary, m.Args = cfg.FirecrackerBinary, cfg.FirecrackerArgs
	vmDir := filepath.Join(cfg.VMsDir(), id)
	if err := os.MkdirAll(vmDir, 0o700); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(vmDir, "disk.ext4")
	if err := os.WriteFile(disk, []byte("not a disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := vmm.Spec{VMID: id, Name: "relay", CPUs: 1, MemoryMiB: 128, Kernel: kernel, Disk: disk,
		RuntimeDir: filepath.Join(cfg.RuntimeDir, "vms", id), ConsoleLog: filepath.Join(vmDir, "console.log"), VsockCID: 3}
	h, err := m.Start(context.Background(), spec)
	if err != nil {
		t.Fatalf("start fake firecracker: %v", err)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })
	st, err := store.Open(cfg.DBPath(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	vm := model.VM{ID: id, Name: "relay", State: model.VMRunning, VMM: firecracker.Name, DiskDriver: "copy", CPUs: 1, MemoryMiB: 128,
		OwnerUID: 65533, Created: time.Now().UTC(), Runtime: model.Runtime{Phase: "running", Monitor: h, RuntimeDir: spec.RuntimeDir, ConsoleLog: spec.ConsoleLog}}
	if err := st.CreateVM(&vm, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	s := daemontest.Start(t, func(c *config.Config) { *c = cfg })
	if got, err := s.D.Store().GetVM("relay"); err != nil || got.State != model.VMRunning {
		t.Fatalf("the VM after the daemon's start: %+v, %v; want it re-adopted, running", got.State, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	owner := clientAs(t, cfg.Socket, 65533, 65533)
	stranger := clientAs(t, cfg.Socket, 65534, 65534)
	root := api.NewClient(cfg.Socket)
	exec := func(c *api.Client, argv []string, eio agent.ExecIO) (agent.ExitStatus, error) {
		conn, err := c.Upgrade(ctx, "/vms/relay/exec", api.ExecRequest{Argv: argv, Stdin: eio.Stdin != nil})
		if err != nil {
			return agent.ExitStatus{}, err
		}
		return agent.RunExec(ctx, conn, eio)
	}
	for name, c := range map[string]*api.Client{"owner (uid 65533)": owner, "root": root} {
		var out bytes.Buffer
		st, err := exec(c, []string{"sh", "-c", "echo relayed-$((6*7)); exit 3"}, agent.ExecIO{Stdout: &out, Stderr: io.Discard})
		if err != nil || st.Code != 3 || out.String() != "relayed-42\n" {
			t.Errorf("exec as %s: %+v, %q, %v; want exit 3 and relayed-42", name, st, out.String(), err)
		}
	}
	for _, p := range []string{"/vms/relay/exec", "/vms/relay/cp/out", "/vms/relay/cp/in", "/vms/relay/ssh"} {
		var body any = api.CopyRequest{Path: "/etc"}
		if strings.HasSuffix(p, "/exec") {
			body = api.ExecRequest{Argv: []string{"true"}}
		} else if strings.HasSuffix(p, "/ssh") {
			body = struct{}{}
		}
		conn, err := stranger.Upgrade(ctx, p, body)
		if err == nil {
			conn.Close()
			t.Errorf("POST %s as uid 65534 was relayed", p)
		} else if api.CodeOf(err) != api.CodeNotFound || strings.Contains(err.Error(), "65533") {
			t.Errorf("POST %s as uid 65534: %v; want not found, saying nothing of the owner", p, err)
		}
		if p == "/vms/relay/ssh" {
			conn, err := owner.Upgrade(ctx, p, body)
			if err != nil {
				t.Errorf("ssh stream as the owner: %v", err)
			} else {
				// The agent's SSH server speaks first.
				_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				b := make([]byte, 8)
				n, _ := io.ReadFull(conn, b)
				if string(b[:n]) != "SSH-2.0-" {
					t.Errorf("ssh stream as the owner starts with %q", b[:n])
				}
				conn.Close()
			}
		}
	}

	// The agent dies mid-stream: the exec ends for the client, promptly.
	pr, pw := io.Pipe()
	defer pw.Close()
	out := &lockedBuffer{}
	type result struct {
		st  agent.ExitStatus
		err error
	}
	done := make(chan result, 1)
	go func() {
		st, err := exec(owner, []string{"cat"}, agent.ExecIO{Stdin: pr, Stdout: out, Stderr: io.Discard})
		done <- result{st, err}
	}()
	if _, err := pw.Write([]byte("before the agent dies\n")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "before the agent dies") {
		if time.Now().After(deadline) {
			t.Fatalf("cat through the relay echoed %q", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := syscall.Kill(h.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if !errors.Is(r.err, agent.ErrSessionLost) {
			t.Errorf("exec whose agent died mid-stream: %+v, %v; want the session lost", r.st, r.err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("exec whose agent died mid-stream still runs after 15s")
	}
	var v api.VersionInfo
	if err := owner.Do(ctx, "GET", "/version", nil, &v); err != nil {
		t.Errorf("the daemon after the agent died mid-stream: %v", err)
	}
	deadline = time.Now().Add(20 * time.Second)
	for {
		got, err := s.D.Store().GetVM("relay")
		if err == nil && got.State != model.VMRunning {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the VM whose monitor was killed is still %s", got.State)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := exec(owner, []string{"true"}, agent.ExecIO{Stdout: io.Discard, Stderr: io.Discard}); api.CodeOf(err) != api.CodeConflict {
		t.Errorf("exec into the VM after its monitor died: %v; want a conflict (not running)", err)
	}
}

// lockedBuffer is a bytes.Buffer safe for a writer and a reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
