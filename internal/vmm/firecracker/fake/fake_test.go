package fake

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/firecracker/apispec"
)

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

type env struct {
	dir, sock, kernel, disk string
	srv                     *Server
	console                 *lockedBuffer
	done                    chan error
}

func start(t *testing.T, agent AgentHandler) *env {
	t.Helper()
	dir := t.TempDir()
	e := &env{dir: dir, sock: filepath.Join(dir, "fc.sock"), kernel: filepath.Join(dir, "vmlinux"), disk: filepath.Join(dir, "disk.img"), console: &lockedBuffer{}, done: make(chan error, 1)}
	for _, f := range []string{e.kernel, e.disk} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	srv, err := New(Options{APISock: e.sock, Console: e.console, Agent: agent})
	if err != nil {
		t.Fatal(err)
	}
	e.srv = srv
	ctx, cancel := context.WithCancel(context.Background())
	go func() { e.done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-e.done
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial("unix", e.sock)
		if err == nil {
			_ = c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fake never listened: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return e
}

// raw sends one request and returns the status and fault_message.
func (e *env) raw(t *testing.T, method, path string, body []byte) (int, string) {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", e.sock)
	}}}
	req, err := http.NewRequest(method, "http://localhost"+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	var f struct {
		FaultMessage string `json:"fault_message"`
	}
	data, _ := io.ReadAll(resp.Body)
	_ = json.Unmarshal(data, &f)
	return resp.StatusCode, f.FaultMessage
}

// TestRejectsWhatTheSpecRejects sends every invalid request of the shared
// corpus: the fake must refuse each with 400 and a fault_message.
func TestRejectsWhatTheSpecRejects(t *testing.T) {
	cases, err := apispec.LoadCorpus("../apispec/testdata/requests.json")
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, nil)
	n := 0
	for _, c := range cases {
		if c.Valid {
			continue
		}
		n++
		status, msg := e.raw(t, c.Method, c.Path, c.Body)
		if status != http.StatusBadRequest || msg == "" {
			t.Errorf("%s: %s %s %s -> %d %q, want 400 with a fault_message", c.Name, c.Method, c.Path, c.Body, status, msg)
		}
	}
	if n < 20 {
		t.Fatalf("only %d invalid corpus cases: corpus not loaded?", n)
	}
}

// booted is the setup of a started fake guest.
var booted = []string{`PUT /boot-source {"kernel_image_path":"KERNEL"}`, `PUT /actions {"action_type":"InstanceStart"}`}

func TestFirecrackerRules(t *testing.T) {
	tests := []struct {
		name  string
		setup []string // requests "METHOD path body" that must succeed first
		req   string
		want  string // substring of the fault_message
	}{
		{"start without boot source", nil, `PUT /actions {"action_type":"InstanceStart"}`, "without kernel configuration"},
		{"ctrl-alt-del before start", nil, `PUT /actions {"action_type":"SendCtrlAltDel"}`, "before starting"},
		{"missing kernel file", nil, `PUT /boot-source {"kernel_image_path":"/nonexistent/vmlinux"}`, "kernel"},
		{"drive id mismatch", nil, `PUT /drives/rootfs {"drive_id":"other","path_on_host":"DISK","is_root_device":true,"is_read_only":false}`, "does not match"},
		{"missing drive file", nil, `PUT /drives/rootfs {"drive_id":"rootfs","path_on_host":"/nonexistent","is_root_device":true,"is_read_only":false}`, "block device"},
		{"two root drives", []string{`PUT /drives/a {"drive_id":"a","path_on_host":"DISK","is_root_device":true,"is_read_only":false}`},
			`PUT /drives/b {"drive_id":"b","path_on_host":"DISK","is_root_device":true,"is_read_only":false}`, "root block device already exists"},
		{"iface id mismatch", nil, `PUT /network-interfaces/eth0 {"iface_id":"eth1","host_dev_name":"tap0"}`, "does not match"},
		{"bad mac", nil, `PUT /network-interfaces/eth0 {"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"zz"}`, "MAC"},
		{"tap name too long", nil, `PUT /network-interfaces/eth0 {"iface_id":"eth0","host_dev_name":"a-very-long-tap-name"}`, "tap"},
		{"zero memory", nil, `PUT /machine-config {"vcpu_count":1,"mem_size_mib":0}`, "memory size"},
		{"odd vcpus with smt", nil, `PUT /machine-config {"vcpu_count":3,"mem_size_mib":128,"smt":true}`, "vCPU"},
		{"vsock path in use", []string{`PUT /vsock {"guest_cid":3,"uds_path":"DIR/v.sock"}`, `PUT /vsock {"guest_cid":3,"uds_path":"DIR/v2.sock"}`},
			`PUT /vsock {"guest_cid":3,"uds_path":"DIR/fc.sock"}`, "vsock"},
		{"config after start", []string{`PUT /boot-source {"kernel_image_path":"KERNEL"}`, `PUT /actions {"action_type":"InstanceStart"}`},
			`PUT /machine-config {"vcpu_count":2,"mem_size_mib":256}`, "after starting"},
		{"start twice", []string{`PUT /boot-source {"kernel_image_path":"KERNEL"}`, `PUT /actions {"action_type":"InstanceStart"}`},
			`PUT /actions {"action_type":"InstanceStart"}`, "only be called once"},
		{"patch drive before start", nil, `PATCH /drives/rootfs {"drive_id":"rootfs"}`, "before starting"},
		{"pause before start", nil, `PATCH /vm {"state":"Paused"}`, "before starting"},
		{"snapshot before start", nil, `PUT /snapshot/create {"snapshot_path":"DIR/s","mem_file_path":"DIR/m"}`, "before starting"},
		{"snapshot of a running VM", booted, `PUT /snapshot/create {"snapshot_path":"DIR/s","mem_file_path":"DIR/m"}`, "must be paused"},
		{"diff snapshot without dirty tracking", append(booted[:2:2], `PATCH /vm {"state":"Paused"}`),
			`PUT /snapshot/create {"snapshot_path":"DIR/s","mem_file_path":"DIR/m","snapshot_type":"Diff"}`, "dirty page tracking"},
		{"snapshot into a missing dir", append(booted[:2:2], `PATCH /vm {"state":"Paused"}`),
			`PUT /snapshot/create {"snapshot_path":"DIR/no/s","mem_file_path":"DIR/no/m"}`, "Cannot write"},
		{"load after configuring", []string{`PUT /machine-config {"vcpu_count":1,"mem_size_mib":128}`},
			`PUT /snapshot/load {"snapshot_path":"DIR/s","mem_file_path":"DIR/m"}`, "not allowed after configuring"},
		{"load after start", booted, `PUT /snapshot/load {"snapshot_path":"DIR/s","mem_file_path":"DIR/m"}`, "after starting"},
		{"load with both memory fields", nil,
			`PUT /snapshot/load {"snapshot_path":"DIR/s","mem_file_path":"DIR/m","mem_backend":{"backend_type":"File","backend_path":"DIR/m"}}`, "mutually exclusive"},
		{"load without memory", nil, `PUT /snapshot/load {"snapshot_path":"DIR/s"}`, "required"},
		{"load a missing state file", nil, `PUT /snapshot/load {"snapshot_path":"DIR/none","mem_file_path":"DIR/m"}`, "no such file"},
		{"load a state file that is not one", nil, `PUT /snapshot/load {"snapshot_path":"KERNEL","mem_file_path":"DIR/m"}`, "not a microVM state file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := start(t, nil)
			send := func(line string) (int, string) {
				line = strings.NewReplacer("KERNEL", e.kernel, "DISK", e.disk, "DIR", e.dir).Replace(line)
				parts := strings.SplitN(line, " ", 3)
				return e.raw(t, parts[0], parts[1], []byte(parts[2]))
			}
			for _, s := range tt.setup {
				if status, msg := send(s); status != http.StatusNoContent {
					t.Fatalf("setup %s: %d %s", s, status, msg)
				}
			}
			status, msg := send(tt.req)
			if status != http.StatusBadRequest || !strings.Contains(msg, tt.want) {
				t.Fatalf("%s -> %d %q, want 400 mentioning %q", tt.req, status, msg, tt.want)
			}
		})
	}
}

// TestBootWithClient drives the fake with the real client: configure,
// start, connect to the guest over the vsock socket, shut down.
func TestBootWithClient(t *testing.T) {
	var gotPort uint32
	var mu sync.Mutex
	e := start(t, func(port uint32, c net.Conn) {
		mu.Lock()
		gotPort = port
		mu.Unlock()
		defer c.Close()
		_, _ = io.Copy(c, c)
	})
	ctx := context.Background()
	c := firecracker.NewClient(e.sock)
	vsock := filepath.Join(e.dir, "v.sock")
	steps := []error{
		c.PutMachineConfig(ctx, firecracker.MachineConfig{VCPUCount: 2, MemSizeMiB: 256}),
		c.PutBootSource(ctx, firecracker.BootSource{KernelImagePath: e.kernel, BootArgs: "console=ttyS0 banger.test=1"}),
		c.PutDrive(ctx, firecracker.Drive{DriveID: "rootfs", PathOnHost: e.disk, IsRootDevice: true}),
		c.PutNetworkInterface(ctx, firecracker.NetworkInterface{IfaceID: "eth0", HostDevName: "tap0", GuestMAC: "06:00:0a:00:00:02"}),
		c.PutVsock(ctx, firecracker.Vsock{GuestCID: 3, UDSPath: vsock}),
	}
	for i, err := range steps {
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	if info, err := c.DescribeInstance(ctx); err != nil || info.State != "Not started" {
		t.Fatalf("DescribeInstance before start = %+v, %v", info, err)
	}
	if err := c.Action(ctx, firecracker.ActionInstanceStart); err != nil {
		t.Fatal(err)
	}
	if info, err := c.DescribeInstance(ctx); err != nil || info.State != "Running" {
		t.Fatalf("DescribeInstance after start = %+v, %v", info, err)
	}
	if !strings.Contains(e.console.String(), "Command line: console=ttyS0 banger.test=1") {
		t.Errorf("console = %q, want the boot args", e.console.String())
	}

	conn, err := net.Dial("unix", vsock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, "CONNECT 1024\nping\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	ok, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(ok, "OK ") {
		t.Fatalf("vsock handshake reply = %q, %v; want OK <port>", ok, err)
	}
	echo, err := br.ReadString('\n')
	if err != nil || echo != "ping\n" {
		t.Fatalf("echo = %q, %v", echo, err)
	}
	mu.Lock()
	if gotPort != 1024 {
		t.Errorf("agent got port %d, want 1024", gotPort)
	}
	mu.Unlock()

	if err := c.Action(ctx, firecracker.ActionSendCtrlAltDel); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.srv.Exited():
	case <-time.After(5 * time.Second):
		t.Fatal("fake did not shut down after SendCtrlAltDel")
	}
	if err := <-e.done; err != nil {
		t.Fatalf("Serve = %v", err)
	}
	e.done <- nil // for the cleanup
}

func TestVsockWithoutListenerClosesConnection(t *testing.T) {
	e := start(t, nil)
	ctx := context.Background()
	c := firecracker.NewClient(e.sock)
	vsock := filepath.Join(e.dir, "v.sock")
	for _, err := range []error{
		c.PutBootSource(ctx, firecracker.BootSource{KernelImagePath: e.kernel}),
		c.PutVsock(ctx, firecracker.Vsock{GuestCID: 3, UDSPath: vsock}),
		c.Action(ctx, firecracker.ActionInstanceStart),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	conn, err := net.Dial("unix", vsock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = fmt.Fprintf(conn, "CONNECT 1024\n")
	b, err := io.ReadAll(conn)
	if len(b) != 0 || (err != nil && !errors.Is(err, io.EOF)) {
		t.Fatalf("read = %q, %v; want the connection closed without OK", b, err)
	}
}

// TestSnapshotRoundTrip pauses, snapshots and resumes a booted fake, then
// loads the files into a second fake: the guest, its devices and its
// vsock come back, and the refusals of a damaged snapshot hold.
func TestSnapshotRoundTrip(t *testing.T) {
	ctx := context.Background()
	e := start(t, nil)
	c := firecracker.NewClient(e.sock)
	vsock := filepath.Join(e.dir, "v.sock")
	for i, err := range []error{
		c.PutMachineConfig(ctx, firecracker.MachineConfig{VCPUCount: 2, MemSizeMiB: 64}),
		c.PutBootSource(ctx, firecracker.BootSource{KernelImagePath: e.kernel}),
		c.PutDrive(ctx, firecracker.Drive{DriveID: "rootfs", PathOnHost: e.disk, IsRootDevice: true}),
		c.PutNetworkInterface(ctx, firecracker.NetworkInterface{IfaceID: "eth0", HostDevName: "tap0", GuestMAC: "06:00:0a:00:00:02"}),
		c.PutVsock(ctx, firecracker.Vsock{GuestCID: 3, UDSPath: vsock}),
		c.Action(ctx, firecracker.ActionInstanceStart),
		c.PatchVM(ctx, firecracker.VMPaused),
	} {
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	if info, err := c.DescribeInstance(ctx); err != nil || info.State != "Paused" {
		t.Fatalf("DescribeInstance after pause = %+v, %v", info, err)
	}
	snap := t.TempDir()
	state, mem := filepath.Join(snap, "state"), filepath.Join(snap, "mem")
	if err := c.CreateSnapshot(ctx, firecracker.SnapshotCreate{SnapshotPath: state, MemFilePath: mem}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(mem); err != nil || fi.Size() != 64<<20 {
		t.Fatalf("memory file: %v, size %d; want 64 MiB", err, size(fi))
	}
	if err := c.PatchVM(ctx, firecracker.VMResumed); err != nil {
		t.Fatal(err)
	}

	load := func(e2 *env, mutate func(*firecracker.SnapshotLoad)) error {
		l := firecracker.SnapshotLoad{
			SnapshotPath: state, MemBackend: &firecracker.MemoryBackend{BackendType: "File", BackendPath: mem}, ResumeVM: true,
			NetworkOverrides: []firecracker.NetworkOverride{{IfaceID: "eth0", HostDevName: "tap1"}},
			VsockOverride:    &firecracker.VsockOverride{UDSPath: filepath.Join(e2.dir, "v.sock")},
		}
		if mutate != nil {
			mutate(&l)
		}
		return firecracker.NewClient(e2.sock).LoadSnapshot(ctx, l)
	}
	refusals := map[string]struct {
		mutate func(*firecracker.SnapshotLoad)
		damage func(t *testing.T)
		want   string
	}{
		"override of an unknown interface": {mutate: func(l *firecracker.SnapshotLoad) {
			l.NetworkOverrides = []firecracker.NetworkOverride{{IfaceID: "eth9", HostDevName: "tap1"}}
		}, want: "no network interface"},
		"vsock socket in use": {mutate: func(l *firecracker.SnapshotLoad) { l.VsockOverride = nil }, want: "vsock"},
		"uffd backend":        {mutate: func(l *firecracker.SnapshotLoad) { l.MemBackend.BackendType = "Uffd" }, want: "Uffd"},
		"truncated memory":    {damage: func(t *testing.T) { truncate(t, mem, 1<<20) }, want: "memory file"},
		"edited state":        {damage: func(t *testing.T) { edit(t, state, `"vcpu_count":2`, `"vcpu_count":4`) }, want: "checksum"},
	}
	for name, r := range refusals {
		t.Run(name, func(t *testing.T) {
			if r.damage != nil {
				for _, p := range []string{state, mem} {
					orig, err := os.ReadFile(p)
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { _ = os.WriteFile(p, orig, 0o600); _ = os.Truncate(mem, 64<<20) })
				}
				r.damage(t)
			}
			err := load(start(t, nil), r.mutate)
			if err == nil || !strings.Contains(err.Error(), r.want) {
				t.Fatalf("LoadSnapshot = %v, want an error mentioning %q", err, r.want)
			}
		})
	}

	e2 := start(t, nil)
	if err := load(e2, nil); err != nil {
		t.Fatalf("LoadSnapshot: %v", err)
	}
	c2 := firecracker.NewClient(e2.sock)
	if info, err := c2.DescribeInstance(ctx); err != nil || info.State != "Running" {
		t.Fatalf("DescribeInstance after load = %+v, %v", info, err)
	}
	if !strings.Contains(e2.console.String(), RestoredLine) {
		t.Errorf("restored console = %q, want %q", e2.console.String(), RestoredLine)
	}
	if err := load(e2, nil); err == nil || !strings.Contains(err.Error(), "after starting") {
		t.Errorf("second LoadSnapshot = %v, want a refusal after start", err)
	}
	if err := c2.PutMachineConfig(ctx, firecracker.MachineConfig{VCPUCount: 1, MemSizeMiB: 64}); err == nil {
		t.Errorf("machine config after a load succeeded")
	}
	if _, err := net.Dial("unix", filepath.Join(e2.dir, "v.sock")); err != nil {
		t.Errorf("restored vsock socket: %v", err)
	}
}

func size(fi os.FileInfo) int64 {
	if fi == nil {
		return -1
	}
	return fi.Size()
}

func truncate(t *testing.T, p string, n int64) {
	t.Helper()
	if err := os.Truncate(p, n); err != nil {
		t.Fatal(err)
	}
}

func edit(t *testing.T, p, old, repl string) {
	t.Helper()
	b, err := os.ReadFile(p) //nolint:gosec // test file
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(old)) {
		t.Fatalf("%s does not contain %q:\n%s", p, old, b)
	}
	if err := os.WriteFile(p, bytes.ReplaceAll(b, []byte(old), []byte(repl)), 0o600); err != nil {
		t.Fatal(err)
	}
}
