package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/atomicfile"
	"github.com/bangerdev/banger/internal/vmm"
)

// TakeParams describe one snapshot to take.
type TakeParams struct {
	Name  string
	Owner uint32
	// Source and Machine describe the VM; Take fills in the monitor's
	// version, the accelerator and the CPU features.
	Source  Source
	Machine Machine
	// Monitor is the VM's backend and Handle its running monitor.
	Monitor vmm.Snapshotter
	Handle  vmm.Handle
	// Disk is the VM's root disk file, copied while the guest is paused.
	Disk string
	// Mounts are the VM's mounted host folders: Take refuses a VM that
	// has any unless Force (their contents are not part of a snapshot).
	Mounts []string
	Force  bool
	// KeepPaused leaves the guest paused (vm snapshot --stop: the caller
	// stops it next).
	KeepPaused bool
	// Progress, when set, receives one line per step.
	Progress func(step string)
}

// Take saves a running VM: it records the snapshot as "creating", has the
// monitor write its state while the guest is paused, copies the disk in
// that pause, checksums every file and only then marks the record ready.
// On any error the snapshot's dir is removed and the guest runs as before.
func (s *Store) Take(ctx context.Context, p TakeParams) (snap Snapshot, err error) {
	if err := ValidateName(p.Name); err != nil {
		return Snapshot{}, err
	}
	if len(p.Mounts) > 0 && !p.Force {
		return Snapshot{}, fmt.Errorf("snapshot %q of VM %q: it has --mount folders %v, whose contents are not part of a snapshot; "+
			"use --force to save it anyway (a restore re-attaches the mounts empty of saved data: the guest sees the host folders as they are then): %w",
			p.Name, p.Source.VMName, strings.Join(p.Mounts, ", "), ErrHasMounts)
	}
	progress := func(format string, a ...any) {
		if p.Progress != nil {
			p.Progress(fmt.Sprintf(format, a...))
		}
	}
	snap = Snapshot{
		ID: newID(), Name: p.Name, Owner: p.Owner, Phase: PhaseCreating, CreatedAt: time.Now().UTC(),
		Source: p.Source, Machine: p.Machine, Mounts: p.Mounts,
	}
	dir, err := s.begin(snap)
	if err != nil {
		return Snapshot{}, err
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(dir)
			err = fmt.Errorf("snapshot %q of VM %q: %w", p.Name, p.Source.VMName, err)
		}
	}()
	s.failpoint(FailTakeIntent)

	progress("pausing VM %s and saving its memory and devices", p.Source.VMName)
	res, err := p.Monitor.Snapshot(ctx, p.Handle, vmm.SnapshotRequest{
		Dir:        dir,
		KeepPaused: p.KeepPaused,
		WhilePaused: func(ctx context.Context) error {
			s.failpoint(FailTakePaused)
			how, err := CopyDisk(ctx, p.Disk, filepath.Join(dir, DiskFileName))
			if err == nil {
				progress("disk copied while paused (%s)", how)
			}
			return err
		},
	})
	if err != nil {
		return Snapshot{}, err
	}
	snap.Pause = res.Pause
	progress("VM paused for %v", res.Pause.Round(time.Millisecond))
	s.failpoint(FailTakeCopied)

	snap.Machine.MonitorVersion, snap.Machine.Accel = res.Version, res.Accel
	if res.Accel == "kvm" {
		if snap.Machine.CPUFeatures, err = HostCPUFeatures(); err != nil {
			return Snapshot{}, err
		}
	}
	progress("checksumming the snapshot's files")
	for _, f := range append(res.Files, DiskFileName) {
		role := RoleState
		if f == DiskFileName {
			role = RoleDisk
		}
		file, err := s.describe(ctx, filepath.Join(dir, f), role)
		if err != nil {
			return Snapshot{}, err
		}
		snap.Files = append(snap.Files, file)
	}
	snap.Phase = PhaseReady
	if err := s.writeRecord(snap); err != nil {
		return Snapshot{}, fmt.Errorf("record snapshot: %w", err)
	}
	return snap, nil
}

// begin checks the name is free and creates the snapshot's dir holding a
// "creating" record, under the store's lock so two takes of one name
// cannot both pass the check.
func (s *Store) begin(snap Snapshot) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return "", fmt.Errorf("snapshot store: %w", err)
	}
	all, _, err := s.all()
	if err != nil {
		return "", err
	}
	for _, other := range all {
		if other.Name == snap.Name && other.Phase != PhaseDeleting {
			return "", fmt.Errorf("snapshot %q (taken of VM %q at %s; banger snapshot rm it first): %w",
				snap.Name, other.Source.VMName, other.CreatedAt.Format(time.RFC3339), ErrExists)
		}
	}
	dir := s.dir(snap.ID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", fmt.Errorf("snapshot dir: %w", err)
	}
	err = s.writeRecord(snap)
	if err == nil {
		err = atomicfile.SyncDir(s.Dir)
	}
	if err != nil {
		_ = os.RemoveAll(dir)
		return "", fmt.Errorf("record snapshot intent: %w", err)
	}
	return dir, nil
}

// describe stats and checksums one file. A file unchanged while it was
// hashed counts as verified (see Verify), so the first restore or clone
// of a snapshot just taken does not read it all again.
func (s *Store) describe(ctx context.Context, path, role string) (File, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return File{}, err
	}
	sum, err := fileSHA256(ctx, path)
	if err != nil {
		return File{}, err
	}
	if st, ok := stampOf(fi); ok {
		if now, ok := statStamp(path); ok && now == st {
			s.markVerified(path, st, sum)
		}
	}
	f := File{Name: filepath.Base(path), Role: role, Size: fi.Size(), SHA256: sum}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		f.Blocks = st.Blocks * 512
	}
	return f, nil
}

var errNoDisk = errors.New("the VM has no disk file")
