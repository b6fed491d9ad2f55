package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/vmm"
)

// RestoreParams describe one restore.
type RestoreParams struct {
	Snapshot Snapshot
	// MonitorName and Monitor are the backend that runs the restored VM.
	MonitorName string
	Monitor     vmm.Snapshotter
	// Spec is the restored VM's monitor spec. Its Disk must not exist:
	// Restore makes it, a copy of the snapshot's disk. CPUs and memory
	// must be the snapshot's.
	Spec vmm.Spec
	// Progress, when set, receives one line per step.
	Progress func(step string)
}

// Restore brings a snapshot back as a running VM: it refuses a snapshot
// this host cannot restore (CheckHost) or whose files fail their checksum
// (Verify), copies the snapshot's disk to p.Spec.Disk and has the monitor
// load the saved state. On error nothing it made is left: no disk copy and
// no monitor process.
func (s *Store) Restore(ctx context.Context, p RestoreParams) (h vmm.Handle, err error) {
	snap := p.Snapshot
	progress := func(format string, a ...any) {
		if p.Progress != nil {
			p.Progress(fmt.Sprintf(format, a...))
		}
	}
	if p.Spec.CPUs != snap.Machine.CPUs || p.Spec.MemoryMiB != snap.Machine.MemoryMiB {
		return vmm.Handle{}, fmt.Errorf("restore snapshot %q: the VM has %d vCPUs and %d MiB, the snapshot %d and %d: %w",
			snap.Name, p.Spec.CPUs, p.Spec.MemoryMiB, snap.Machine.CPUs, snap.Machine.MemoryMiB, ErrIncompatible)
	}
	if err := CheckHost(ctx, snap, p.MonitorName, p.Monitor); err != nil {
		return vmm.Handle{}, err
	}
	progress("verifying the snapshot's checksums")
	if err := s.Verify(ctx, snap); err != nil {
		return vmm.Handle{}, err
	}
	if p.Spec.Disk == "" {
		return vmm.Handle{}, fmt.Errorf("restore snapshot %q: %w", snap.Name, errNoDisk)
	}
	how, err := CopyDisk(ctx, filepath.Join(s.dir(snap.ID), DiskFileName), p.Spec.Disk)
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("restore snapshot %q: %w", snap.Name, err)
	}
	defer func() {
		if err != nil {
			if rerr := os.Remove(p.Spec.Disk); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				err = errors.Join(err, rerr)
			}
		}
	}()
	progress("disk ready (%s)", how)
	s.failpoint(FailRestoreDisk)
	progress("loading the saved memory and devices")
	h, err = p.Monitor.Restore(ctx, p.Spec, s.dir(snap.ID))
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("restore snapshot %q: %w", snap.Name, err)
	}
	return h, nil
}
