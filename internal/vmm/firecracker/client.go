package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Client speaks Firecracker's REST API over its Unix socket. It sends only
// the requests listed below; each is checked against firecracker.yaml by the
// package's contract test.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the API socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableKeepAlives: true,
	}
	return &Client{socket: path, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// MachineConfig is the MachineConfiguration definition (the fields banger sets).
type MachineConfig struct {
	VCPUCount  int  `json:"vcpu_count"`
	MemSizeMiB int  `json:"mem_size_mib"`
	SMT        bool `json:"smt"`
}

// BootSource is the BootSource definition.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

// Drive is the Drive definition for a virtio-block drive.
type Drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
	CacheType    string `json:"cache_type,omitempty"` // "Unsafe" (default) or "Writeback"
	IOEngine     string `json:"io_engine,omitempty"`  // "Sync" (default) or "Async"
}

// NetworkInterface is the NetworkInterface definition.
type NetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
}

// Vsock is the Vsock definition.
type Vsock struct {
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// InstanceInfo is the InstanceInfo definition (GET /).
type InstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"` // "Not started", "Running", "Paused"
	VMMVersion string `json:"vmm_version"`
}

// ActionType is an InstanceActionInfo.action_type.
type ActionType string

// The actions banger sends.
const (
	ActionInstanceStart  ActionType = "InstanceStart"
	ActionSendCtrlAltDel ActionType = "SendCtrlAltDel"
)

// APIError is an error response from Firecracker.
type APIError struct {
	Method, Path string
	Status       int
	FaultMessage string
}

// Error implements error.
func (e *APIError) Error() string {
	msg := e.FaultMessage
	if msg == "" {
		msg = "(no fault_message)"
	}
	return fmt.Sprintf("firecracker %s %s: %d %s: %s", e.Method, e.Path, e.Status, http.StatusText(e.Status), msg)
}

// PutMachineConfig sends PUT /machine-config.
func (c *Client) PutMachineConfig(ctx context.Context, mc MachineConfig) error {
	return c.do(ctx, http.MethodPut, "/machine-config", mc, nil)
}

// PutBootSource sends PUT /boot-source.
func (c *Client) PutBootSource(ctx context.Context, bs BootSource) error {
	return c.do(ctx, http.MethodPut, "/boot-source", bs, nil)
}

// PutDrive sends PUT /drives/{drive_id}.
func (c *Client) PutDrive(ctx context.Context, d Drive) error {
	if err := checkID("drive_id", d.DriveID); err != nil {
		return err
	}
	return c.do(ctx, http.MethodPut, "/drives/"+d.DriveID, d, nil)
}

// PutNetworkInterface sends PUT /network-interfaces/{iface_id}.
func (c *Client) PutNetworkInterface(ctx context.Context, ni NetworkInterface) error {
	if err := checkID("iface_id", ni.IfaceID); err != nil {
		return err
	}
	return c.do(ctx, http.MethodPut, "/network-interfaces/"+ni.IfaceID, ni, nil)
}

// PutVsock sends PUT /vsock.
func (c *Client) PutVsock(ctx context.Context, v Vsock) error {
	return c.do(ctx, http.MethodPut, "/vsock", v, nil)
}

// Action sends PUT /actions.
func (c *Client) Action(ctx context.Context, a ActionType) error {
	return c.do(ctx, http.MethodPut, "/actions", struct {
		ActionType ActionType `json:"action_type"`
	}{a}, nil)
}

// DescribeInstance sends GET /.
func (c *Client) DescribeInstance(ctx context.Context) (InstanceInfo, error) {
	var info InstanceInfo
	err := c.do(ctx, http.MethodGet, "/", nil, &info)
	return info, err
}

// VMState is a Vm.state: the running state of a booted microVM.
type VMState string

// The states PATCH /vm sets.
const (
	VMPaused  VMState = "Paused"
	VMResumed VMState = "Resumed"
)

// PatchVM sends PATCH /vm, pausing or resuming a booted microVM.
func (c *Client) PatchVM(ctx context.Context, state VMState) error {
	return c.do(ctx, http.MethodPatch, "/vm", struct {
		State VMState `json:"state"`
	}{state}, nil)
}

// SnapshotCreate is the SnapshotCreateParams definition.
type SnapshotCreate struct {
	MemFilePath  string `json:"mem_file_path"`
	SnapshotPath string `json:"snapshot_path"`
	SnapshotType string `json:"snapshot_type,omitempty"` // "Full" (default) or "Diff"
}

// CreateSnapshot sends PUT /snapshot/create (the microVM must be paused).
func (c *Client) CreateSnapshot(ctx context.Context, p SnapshotCreate) error {
	return c.do(ctx, http.MethodPut, "/snapshot/create", p, nil)
}

// MemoryBackend is the MemoryBackend definition.
type MemoryBackend struct {
	BackendType string `json:"backend_type"` // "File" or "Uffd"
	BackendPath string `json:"backend_path"`
}

// NetworkOverride is the NetworkOverride definition: the tap a restored
// interface uses instead of the one recorded in the snapshot.
type NetworkOverride struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

// VsockOverride is the VsockOverride definition.
type VsockOverride struct {
	UDSPath string `json:"uds_path"`
}

// SnapshotLoad is the SnapshotLoadParams definition (the fields banger sets).
type SnapshotLoad struct {
	SnapshotPath     string            `json:"snapshot_path"`
	MemBackend       *MemoryBackend    `json:"mem_backend,omitempty"`
	ResumeVM         bool              `json:"resume_vm"`
	NetworkOverrides []NetworkOverride `json:"network_overrides,omitempty"`
	VsockOverride    *VsockOverride    `json:"vsock_override,omitempty"`
}

// LoadSnapshot sends PUT /snapshot/load (on a fresh, unconfigured process).
func (c *Client) LoadSnapshot(ctx context.Context, p SnapshotLoad) error {
	return c.do(ctx, http.MethodPut, "/snapshot/load", p, nil)
}

// Version sends GET /version and returns firecracker_version.
func (c *Client) Version(ctx context.Context) (string, error) {
	var v struct {
		FirecrackerVersion string `json:"firecracker_version"`
	}
	err := c.do(ctx, http.MethodGet, "/version", nil, &v)
	return v.FirecrackerVersion, err
}

// checkID refuses ids that would change the request path. Firecracker's own
// ids are alphanumeric plus '_' (and '-' is accepted here too).
func checkID(what, id string) error {
	if id == "" || len(id) > 64 {
		return fmt.Errorf("firecracker %s %q: must be 1 to 64 characters", what, id)
	}
	for _, r := range id {
		if !idChar(r) {
			return fmt.Errorf("firecracker %s %q: only letters, digits, '_' and '-' are allowed", what, id)
		}
	}
	return nil
}

func idChar(r rune) bool {
	return r == '_' || r == '-' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z'
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("firecracker %s %s: encode body: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, body)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s via %s: %w", method, path, c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("firecracker %s %s: read response: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		apiErr := &APIError{Method: method, Path: path, Status: resp.StatusCode}
		var fault struct {
			FaultMessage string `json:"fault_message"`
		}
		if json.Unmarshal(data, &fault) == nil {
			apiErr.FaultMessage = fault.FaultMessage
		} else {
			apiErr.FaultMessage = string(bytes.TrimSpace(data))
		}
		return apiErr
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("firecracker %s %s: decode response: %w", method, path, err)
		}
	}
	return nil
}
