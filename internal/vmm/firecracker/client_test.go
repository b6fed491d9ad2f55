package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker/apispec"
)

// specServer is an API server that validates every request against
// firecracker.yaml and records it.
type specServer struct {
	t    *testing.T
	spec *apispec.Spec
	mu   sync.Mutex
	seen []string // "METHOD path"
	bad  []string
	// fault, when set, is returned for every request.
	fault string
}

func newSpecServer(t *testing.T) (*specServer, string) {
	t.Helper()
	spec, err := apispec.Load()
	if err != nil {
		t.Fatal(err)
	}
	s := &specServer{t: t, spec: spec}
	sock := filepath.Join(t.TempDir(), "fc.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: s} //nolint:gosec // test server
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return s, sock
}

func (s *specServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	op, err := s.spec.ValidateRequest(r.Method, r.URL.Path, body)
	s.mu.Lock()
	s.seen = append(s.seen, r.Method+" "+r.URL.Path)
	if err != nil {
		s.bad = append(s.bad, err.Error())
	}
	fault := s.fault
	s.mu.Unlock()
	switch {
	case err != nil:
		w.WriteHeader(http.StatusBadRequest)
		_ = json.NewEncoder(w).Encode(map[string]string{"fault_message": err.Error()})
	case fault != "":
		w.WriteHeader(http.StatusBadRequest)
		_ = json.NewEncoder(w).Encode(map[string]string{"fault_message": fault})
	case op.OperationID == "getFirecrackerVersion":
		_ = json.NewEncoder(w).Encode(map[string]string{"firecracker_version": "1.17.0"})
	case op.OperationID == "describeInstance":
		_ = json.NewEncoder(w).Encode(InstanceInfo{AppName: "Firecracker", ID: "x", State: "Running", VMMVersion: "1.17.0"})
	default:
		w.WriteHeader(http.StatusNoContent)
	}
}

func (s *specServer) check(t *testing.T, wantRequests int) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, b := range s.bad {
		t.Errorf("request violates firecracker.yaml: %s", b)
	}
	if len(s.seen) != wantRequests {
		t.Errorf("server saw %d requests %v, want %d", len(s.seen), s.seen, wantRequests)
	}
	s.seen, s.bad = nil, nil
}

// TestClientContract sends every request the client can send, with the
// variations the backend uses, to a server that validates each against
// firecracker.yaml. A new Client method without a case here fails the test.
func TestClientContract(t *testing.T) {
	ctx := context.Background()
	calls := map[string][]func(*Client) error{
		"PutMachineConfig": {
			func(c *Client) error { return c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 1, MemSizeMiB: 128}) },
			func(c *Client) error { return c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 32, MemSizeMiB: 65536}) },
		},
		"PutBootSource": {
			func(c *Client) error { return c.PutBootSource(ctx, BootSource{KernelImagePath: "/k"}) },
			func(c *Client) error {
				return c.PutBootSource(ctx, BootSource{KernelImagePath: "/k", InitrdPath: "/i", BootArgs: "console=ttyS0 reboot=k panic=1"})
			},
		},
		"PutDrive": {
			func(c *Client) error {
				return c.PutDrive(ctx, Drive{DriveID: "rootfs", PathOnHost: "/d", IsRootDevice: true})
			},
			func(c *Client) error {
				return c.PutDrive(ctx, Drive{DriveID: "data_1", PathOnHost: "/d", IsReadOnly: true, CacheType: "Writeback", IOEngine: "Async"})
			},
		},
		"PutNetworkInterface": {
			func(c *Client) error {
				return c.PutNetworkInterface(ctx, NetworkInterface{IfaceID: "eth0", HostDevName: "tap0"})
			},
			func(c *Client) error {
				return c.PutNetworkInterface(ctx, NetworkInterface{IfaceID: "eth0", HostDevName: "bgr-tap0", GuestMAC: "06:00:ac:10:00:02"})
			},
		},
		"PutVsock": {
			func(c *Client) error { return c.PutVsock(ctx, Vsock{GuestCID: 3, UDSPath: "/run/v.sock"}) },
			func(c *Client) error { return c.PutVsock(ctx, Vsock{GuestCID: 1<<32 - 1, UDSPath: "/run/v.sock"}) },
		},
		"Action": {
			func(c *Client) error { return c.Action(ctx, ActionInstanceStart) },
			func(c *Client) error { return c.Action(ctx, ActionSendCtrlAltDel) },
		},
		"PatchVM": {
			func(c *Client) error { return c.PatchVM(ctx, VMPaused) },
			func(c *Client) error { return c.PatchVM(ctx, VMResumed) },
		},
		"CreateSnapshot": {
			func(c *Client) error {
				return c.CreateSnapshot(ctx, SnapshotCreate{MemFilePath: "/s/mem", SnapshotPath: "/s/state"})
			},
			func(c *Client) error {
				return c.CreateSnapshot(ctx, SnapshotCreate{MemFilePath: "/s/mem", SnapshotPath: "/s/state", SnapshotType: "Full"})
			},
		},
		"LoadSnapshot": {
			func(c *Client) error {
				return c.LoadSnapshot(ctx, SnapshotLoad{SnapshotPath: "/s/state", MemBackend: &MemoryBackend{BackendType: "File", BackendPath: "/s/mem"}})
			},
			func(c *Client) error {
				return c.LoadSnapshot(ctx, SnapshotLoad{
					SnapshotPath: "/s/state", MemBackend: &MemoryBackend{BackendType: "File", BackendPath: "/s/mem"}, ResumeVM: true,
					NetworkOverrides: []NetworkOverride{{IfaceID: "eth0", HostDevName: "bgr-tap9"}},
					VsockOverride:    &VsockOverride{UDSPath: "/run/b/agent.sock"},
				})
			},
		},
		"Version": {
			func(c *Client) error {
				v, err := c.Version(ctx)
				if err == nil && v != "1.17.0" {
					return errors.New("Version = " + v)
				}
				return err
			},
		},
		"DescribeInstance": {
			func(c *Client) error {
				info, err := c.DescribeInstance(ctx)
				if err == nil && info.State != "Running" {
					return errors.New("DescribeInstance state = " + info.State)
				}
				return err
			},
		},
	}
	typ := reflect.TypeOf(&Client{})
	for i := range typ.NumMethod() {
		if _, ok := calls[typ.Method(i).Name]; !ok {
			t.Errorf("Client.%s has no contract case: add one", typ.Method(i).Name)
		}
	}
	srv, sock := newSpecServer(t)
	c := NewClient(sock)
	for name, fns := range calls {
		for i, fn := range fns {
			if err := fn(c); err != nil {
				t.Errorf("%s case %d: %v", name, i, err)
			}
			srv.check(t, 1)
		}
	}
}

// TestConfigureContract checks the backend's whole configuration sequence
// for the Spec shapes banger uses.
func TestConfigureContract(t *testing.T) {
	specs := map[string]struct {
		spec vmm.Spec
		n    int
	}{
		"minimal":  {vmm.Spec{Name: "a", CPUs: 1, MemoryMiB: 128, Kernel: "/k", RuntimeDir: "/run/a", ConsoleLog: "/run/a/console.log"}, 4},
		"complete": {vmm.Spec{Name: "b", CPUs: 2, MemoryMiB: 1024, Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0 banger.ip=10.0.0.2/24", Disk: "/dev/loop3", Tap: "bgr0", MAC: "06:00:0a:00:00:02", RuntimeDir: "/run/b", ConsoleLog: "/run/b/c.log", VsockCID: 42}, 6},
	}
	for name, tt := range specs {
		t.Run(name, func(t *testing.T) {
			srv, sock := newSpecServer(t)
			spec := tt.spec
			if err := spec.Validate(); err != nil {
				t.Fatal(err)
			}
			if err := configure(context.Background(), NewClient(sock), spec); err != nil {
				t.Fatalf("configure: %v", err)
			}
			srv.check(t, tt.n)
		})
	}
}

func TestAPIErrorSurfaces(t *testing.T) {
	srv, sock := newSpecServer(t)
	srv.fault = "The kernel file cannot be opened: No such file"
	err := NewClient(sock).PutBootSource(context.Background(), BootSource{KernelImagePath: "/nope"})
	var apiErr *APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("PutBootSource error = %v (%T), want *APIError", err, err)
	}
	for _, want := range []string{"PUT /boot-source", "400", "kernel file cannot be opened"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestClientRefusesPathChangingIDs(t *testing.T) {
	_, sock := newSpecServer(t)
	c := NewClient(sock)
	for _, id := range []string{"", "../actions", "a/b", "a?b", strings.Repeat("x", 65)} {
		if err := c.PutDrive(context.Background(), Drive{DriveID: id, PathOnHost: "/d"}); err == nil {
			t.Errorf("PutDrive(id %q) = nil, want an error", id)
		}
		if err := c.PutNetworkInterface(context.Background(), NetworkInterface{IfaceID: id, HostDevName: "t"}); err == nil {
			t.Errorf("PutNetworkInterface(id %q) = nil, want an error", id)
		}
	}
}
