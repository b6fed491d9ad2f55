// Package lifecycle creates, starts, stops and deletes VMs. Every step
// follows record → create → confirm: a resource is written into VM.Runtime
// (and the VM's handles.json) before it is made, and confirmed after, so a
// crash at any line leaves enough on disk for start-up recovery (package
// reconciler) to find and release it. Releasing is verified (OwnRuntime)
// and done in one place (ReleaseAndMark).
//
// A started VM gets a supervisor (package supervisor) that watches its
// monitor, waits for its guest to boot and holds its agent session;
// Supervisor returns it for the capabilities that need the agent.
package lifecycle

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/atomicfile"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/snapshot"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/supervisor"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/qemu"
)

// KernelResolver finds a kernel by name (local first, then the kernel
// catalog). The image service implements it.
type KernelResolver interface {
	ResolveKernel(ctx context.Context, ref string, report progress.Func) (model.Kernel, error)
}

// Options configure a Service.
type Options struct {
	Config  config.Config
	Store   *store.Store
	Logger  *slog.Logger
	Kernels KernelResolver
	// Background is the context of background work (supervisors); it
	// ends when the daemon shuts down.
	Background context.Context
	// Snapshots is the snapshot store (snapshot.go).
	Snapshots *snapshot.Store
}

// Service runs the VM lifecycle.
type Service struct {
	cfg     config.Config
	store   *store.Store
	log     *slog.Logger
	kernels KernelResolver
	bg      context.Context

	locksMu sync.Mutex
	locks   map[string]*sync.Mutex

	sups  supervisor.Set
	pub   published  // open published ports (ports.go)
	mnt   attached   // mounted host folders (mounts.go)
	netMu sync.Mutex // the bridge and the NAT table
	snaps *snapshot.Store
	syncs *blockdev.Syncer // background flushes of new disk copies (create)
}

// New returns a Service.
func New(o Options) *Service {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Background == nil {
		o.Background = context.Background()
	}
	return &Service{cfg: o.Config, store: o.Store, log: o.Logger, kernels: o.Kernels, bg: o.Background, locks: map[string]*sync.Mutex{}, snaps: o.Snapshots,
		syncs: &blockdev.Syncer{Log: o.Logger}}
}

// Lock returns the mutex serializing operations on the VM with id.
func (s *Service) Lock(id string) *sync.Mutex {
	s.locksMu.Lock()
	defer s.locksMu.Unlock()
	m, ok := s.locks[id]
	if !ok {
		m = &sync.Mutex{}
		s.locks[id] = m
	}
	return m
}

// Supervisor returns the supervisor of a running VM, or nil: the handle to
// its agent session for exec, cp, ssh, port forwards, mounts and snapshots.
func (s *Service) Supervisor(id string) *supervisor.Supervisor { return s.sups.Get(id) }

// VMDir is where a VM's persistent files live (disk, console log).
func (s *Service) VMDir(id string) string { return filepath.Join(s.cfg.VMsDir(), id) }

// RuntimeDirs is the parent of every VM's runtime dir.
func (s *Service) RuntimeDirs() string { return filepath.Join(s.cfg.RuntimeDir, "vms") }

// RuntimeDir is where a running VM's sockets and handles.json live.
func (s *Service) RuntimeDir(id string) string { return filepath.Join(s.RuntimeDirs(), id) }

// ConsoleLog is the VM's serial console log.
func (s *Service) ConsoleLog(id string) string { return filepath.Join(s.VMDir(id), "console.log") }

// NetConfig is the configured network.
func (s *Service) NetConfig() (netctl.Config, error) {
	subnet, err := netip.ParsePrefix(s.cfg.Subnet)
	if err != nil {
		return netctl.Config{}, fmt.Errorf("config subnet %q: %w", s.cfg.Subnet, err)
	}
	c := netctl.Config{Bridge: s.cfg.Bridge, Subnet: subnet}.WithDefaults()
	return c, c.Validate()
}

// Disks is the disk manager.
func (s *Service) Disks() *blockdev.Manager {
	return &blockdev.Manager{StateDir: s.cfg.StateDir, Syncs: s.syncs}
}

// diskPath is the disk file of a VM with a copy or reflink disk.
func (s *Service) diskPath(id string) string {
	return filepath.Join(s.VMDir(id), blockdev.DiskFileName)
}

// cancelDiskFlush stops a background flush of the VM's new disk copy from
// promoting it, before the disk is removed or replaced.
func (s *Service) cancelDiskFlush(id string) { s.syncs.Cancel(s.diskPath(id)) }

// WaitDiskFlushes waits for the background flushes of new disks under way
// (daemon shutdown), until ctx ends.
func (s *Service) WaitDiskFlushes(ctx context.Context) error { return s.syncs.WaitAll(ctx) }

// Monitor returns the VM monitor backend of the given name, configured.
func (s *Service) Monitor(name string) (vmm.Monitor, error) {
	switch name {
	case firecracker.Name:
		m := firecracker.New()
		if s.cfg.FirecrackerBinary != "" {
			m.Binary = s.cfg.FirecrackerBinary
		}
		m.Args = append([]string(nil), s.cfg.FirecrackerArgs...)
		m.Jailer = s.cfg.Jailer()
		return m, nil
	case qemu.Name:
		m := qemu.New()
		if s.cfg.QEMUBinary != "" {
			m.Binary = s.cfg.QEMUBinary
		}
		return m, nil
	}
	return vmm.Get(name)
}

// MonitorPrograms are the programs the configured monitors run, as their
// processes show them (for finding monitors by their command line).
func (s *Service) MonitorPrograms() []string {
	fc, _ := s.Monitor(firecracker.Name)
	qm, _ := s.Monitor(qemu.Name)
	return []string{fc.(*firecracker.Monitor).Binary, qm.(*qemu.Monitor).Binary}
}

// Handles is the content of a running VM's handles.json: everything needed
// to tear it down without the store.
type Handles struct {
	VMID    string        `json:"vm_id"`
	Written time.Time     `json:"written"`
	Runtime model.Runtime `json:"runtime"`
}

// HandlesPath is the VM's handles.json.
func (s *Service) HandlesPath(id string) string {
	return filepath.Join(s.RuntimeDir(id), "handles.json")
}

// WriteHandles writes handles.json atomically into the VM's runtime dir.
func (s *Service) WriteHandles(vm model.VM) error {
	dir := s.RuntimeDir(vm.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	raw, err := json.MarshalIndent(Handles{VMID: vm.ID, Written: time.Now().UTC(), Runtime: vm.Runtime}, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(s.HandlesPath(vm.ID), raw, 0o600)
}

// LoadHandles reads a VM's handles.json. The error says why the file cannot
// be used: missing, empty, truncated or not JSON, or written for another VM.
func (s *Service) LoadHandles(vmID string) (model.Runtime, error) {
	raw, err := os.ReadFile(s.HandlesPath(vmID))
	if errors.Is(err, fs.ErrNotExist) {
		return model.Runtime{}, errors.New("handles.json is missing")
	}
	if err != nil {
		return model.Runtime{}, fmt.Errorf("read handles.json: %w", err)
	}
	if len(strings.TrimSpace(string(raw))) == 0 {
		return model.Runtime{}, errors.New("handles.json is empty")
	}
	var h struct {
		VMID    string          `json:"vm_id"`
		Runtime json.RawMessage `json:"runtime"`
	}
	if err := json.Unmarshal(raw, &h); err != nil {
		return model.Runtime{}, fmt.Errorf("handles.json is truncated or not JSON: %w", err)
	}
	if h.VMID != vmID {
		return model.Runtime{}, fmt.Errorf("handles.json was written for VM %q", h.VMID)
	}
	// A daemon before the composed runtime wrote the flat one.
	rt, err := store.DecodeRuntime(h.Runtime)
	if err != nil {
		return model.Runtime{}, fmt.Errorf("handles.json is truncated or not JSON: %w", err)
	}
	return rt, nil
}

// HasHandles reports whether the VM's handles.json exists.
func (s *Service) HasHandles(id string) bool {
	_, err := os.Stat(s.HandlesPath(id))
	return err == nil
}

// setRuntime records rt on the VM (intent or confirmation) and mirrors it
// into handles.json.
func (s *Service) setRuntime(id string, fn func(*model.Runtime)) (model.VM, error) {
	vm, err := s.store.UpdateVM(id, func(vm *model.VM) error {
		fn(&vm.Runtime)
		return nil
	})
	if err != nil {
		return vm, err
	}
	if vm.Runtime.RuntimeDir != "" {
		if err := s.WriteHandles(vm); err != nil {
			return vm, fmt.Errorf("write handles.json: %w", err)
		}
	}
	return vm, nil
}

// SetState moves the VM to state st with reason; extra may change more of
// the record in the same update.
func (s *Service) SetState(id string, st model.VMState, reason string, extra func(*model.VM)) (model.VM, error) {
	return s.store.UpdateVM(id, func(vm *model.VM) error {
		vm.State, vm.Reason = st, reason
		switch st {
		case model.VMStopped, model.VMError:
			vm.StoppedAt = time.Now().UTC()
		}
		if extra != nil {
			extra(vm)
		}
		return nil
	})
}
