package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
)

// The state files of a Firecracker snapshot, inside the snapshot dir.
const (
	StateFileName  = "fc-vmstate"
	MemoryFileName = "fc-memory"
)

var _ vmm.Snapshotter = (*Monitor)(nil)

// Snapshot implements vmm.Snapshotter: PATCH /vm Paused, PUT
// /snapshot/create (a full snapshot: the microVM state and its memory),
// req.WhilePaused, then PATCH /vm Resumed. Firecracker has no live
// pre-copy, so the pause covers writing the whole memory file.
func (m *Monitor) Snapshot(ctx context.Context, h vmm.Handle, req vmm.SnapshotRequest) (res vmm.SnapshotResult, err error) {
	if h.Jail != "" {
		return vmm.SnapshotResult{}, fmt.Errorf("snapshot of firecracker pid %d: snapshots of a VM under the jailer: %w", h.PID, vmm.ErrNotSupported)
	}
	fail := func(format string, a ...any) error {
		return fmt.Errorf("snapshot firecracker pid %d: %w", h.PID, fmt.Errorf(format, a...))
	}
	if alive, aerr := vmm.Alive(h); aerr != nil || !alive {
		return res, fail("%w", vmm.ErrNotRunning)
	}
	c := NewClient(h.APISocket)
	info, err := c.DescribeInstance(ctx)
	if err != nil {
		return res, fail("%w", err)
	}
	if info.State != "Running" {
		return res, fail("instance state is %q: only a running guest is saved (%w)", info.State, vmm.ErrNotRunning)
	}
	ver, err := c.Version(ctx)
	if err != nil {
		return res, fail("%w", err)
	}
	res.Version, res.Accel = "Firecracker v"+ver, "kvm"
	state, mem := filepath.Join(req.Dir, StateFileName), filepath.Join(req.Dir, MemoryFileName)
	for _, p := range []string{state, mem} {
		if _, err := os.Lstat(p); err == nil {
			return res, fail("%s already exists", p)
		}
	}

	if err := c.PatchVM(ctx, VMPaused); err != nil {
		return res, fail("pause: %w", err)
	}
	paused := time.Now()
	defer func() {
		if err != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			if rerr := c.PatchVM(cctx, VMResumed); rerr != nil {
				err = fmt.Errorf("%w; and the guest could not be resumed: %w", err, rerr)
			}
			_ = os.Remove(state)
			_ = os.Remove(mem)
		}
	}()
	if err := c.CreateSnapshot(ctx, SnapshotCreate{MemFilePath: mem, SnapshotPath: state, SnapshotType: "Full"}); err != nil {
		return res, fail("%w", err)
	}
	for _, p := range []string{state, mem} {
		if err := syncPath(p); err != nil {
			return res, fail("sync %s: %w", p, err)
		}
	}
	if req.WhilePaused != nil {
		if err := req.WhilePaused(ctx); err != nil {
			return res, fail("%w", err)
		}
	}
	res.Files = []string{StateFileName, MemoryFileName}
	if req.KeepPaused {
		res.Pause = time.Since(paused)
		return res, nil
	}
	if err := c.PatchVM(ctx, VMResumed); err != nil {
		return res, fail("resume: %w", err)
	}
	res.Pause = time.Since(paused)
	return res, nil
}

func syncPath(p string) error {
	f, err := os.Open(p) //nolint:gosec // the daemon's snapshot dir
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// Restore implements vmm.Snapshotter: a fresh firecracker process, PUT
// /snapshot/load with the spec's tap and agent socket as overrides (the
// disk is found through the runtime dir's DiskLinkName), resumed at once.
func (m *Monitor) Restore(ctx context.Context, spec vmm.Spec, dir string) (vmm.Handle, error) {
	if m.Jailer != nil {
		return vmm.Handle{}, fmt.Errorf("restore firecracker for VM %q: restores under the jailer: %w", spec.Name, vmm.ErrNotSupported)
	}
	state, mem := filepath.Join(dir, StateFileName), filepath.Join(dir, MemoryFileName)
	for _, p := range []string{state, mem} {
		if _, err := os.Stat(p); err != nil {
			return vmm.Handle{}, fmt.Errorf("restore firecracker for VM %q: %w", spec.Name, err)
		}
	}
	return m.launch(ctx, spec, "restore", func(ctx context.Context, c *Client, spec vmm.Spec) error {
		load := SnapshotLoad{
			SnapshotPath: state,
			MemBackend:   &MemoryBackend{BackendType: "File", BackendPath: mem},
			ResumeVM:     true,
			// Every restored VM has its own agent socket.
			VsockOverride: &VsockOverride{UDSPath: spec.AgentSocket},
		}
		if spec.Tap != "" {
			load.NetworkOverrides = []NetworkOverride{{IfaceID: ifaceID, HostDevName: spec.Tap}}
		}
		return c.LoadSnapshot(ctx, load)
	})
}

// Resume implements vmm.Snapshotter.
func (m *Monitor) Resume(ctx context.Context, h vmm.Handle) error {
	if alive, err := vmm.Alive(h); err != nil || !alive {
		return fmt.Errorf("resume firecracker pid %d: %w", h.PID, vmm.ErrNotRunning)
	}
	c := NewClient(h.APISocket)
	info, err := c.DescribeInstance(ctx)
	if err != nil {
		return fmt.Errorf("resume firecracker pid %d: %w", h.PID, err)
	}
	switch info.State {
	case "Running":
		return nil
	case "Paused":
		if err := c.PatchVM(ctx, VMResumed); err != nil {
			return fmt.Errorf("resume firecracker pid %d: %w", h.PID, err)
		}
		return nil
	}
	return fmt.Errorf("resume firecracker pid %d: instance state %q: %w", h.PID, info.State, errNotBooted)
}

// Version implements vmm.Snapshotter: `firecracker --version`'s first
// line, "Firecracker v1.7.0".
func (m *Monitor) Version(ctx context.Context) (string, error) {
	bin, err := exec.LookPath(m.Binary)
	if err != nil {
		return "", fmt.Errorf("firecracker version: %w", err)
	}
	args := append(append([]string{}, m.Args...), "--version")
	out, err := exec.CommandContext(ctx, bin, args...).Output() //nolint:gosec // binary is configuration
	if err != nil {
		return "", fmt.Errorf("firecracker version: %s --version: %w", bin, err)
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if !strings.HasPrefix(line, "Firecracker v") {
		return "", fmt.Errorf("firecracker version: %w: unexpected output %q", errBadVersion, line)
	}
	return strings.TrimSpace(line), nil
}

var errBadVersion = errors.New("not a firecracker --version line")
