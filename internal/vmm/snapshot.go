package vmm

import (
	"context"
	"time"
)

// Snapshotter is the optional capability to save a running VM whole (its
// memory and device state) into files and to start a VM again from them.
// Find it with a type assertion on a Monitor; a backend without it makes
// the daemon answer ErrNotSupported.
//
// The disk is not part of a backend's state: the caller copies it in
// SnapshotRequest.WhilePaused, while the guest cannot write to it, so the
// disk and the memory describe the same instant.
type Snapshotter interface {
	// Snapshot pauses the VM of h, writes its state into req.Dir, calls
	// req.WhilePaused and resumes the guest (unless req.KeepPaused). On
	// any error the files it wrote are removed and the guest is running
	// as before.
	Snapshot(ctx context.Context, h Handle, req SnapshotRequest) (SnapshotResult, error)
	// Restore launches a monitor for spec that loads the state saved in
	// dir instead of booting, and returns once the guest runs. spec must
	// describe the same machine (CPUs, memory, kernel, devices) as the VM
	// that was saved; its disk, tap, MAC, sockets and runtime dir may
	// differ. On error nothing it started is left running.
	Restore(ctx context.Context, spec Spec, dir string) (Handle, error)
	// Resume makes a VM paused by an interrupted Snapshot run again. A
	// running VM is left alone. Reconcile calls it after a daemon crash.
	Resume(ctx context.Context, h Handle) error
	// Version names the monitor program that would run a restore, such
	// as "QEMU 7.2.22": a saved state is only restored by the same one.
	Version(ctx context.Context) (string, error)
}

// SnapshotRequest says where and how to save a VM.
type SnapshotRequest struct {
	// Dir is an existing, empty directory for the backend's files.
	Dir string
	// WhilePaused, when set, runs while the guest is paused and its state
	// has been written: copy the disk here. An error aborts the snapshot.
	WhilePaused func(ctx context.Context) error
	// KeepPaused leaves the guest paused after a successful snapshot (the
	// caller is about to stop it).
	KeepPaused bool
}

// SnapshotResult describes a saved VM.
type SnapshotResult struct {
	// Files are the names, inside SnapshotRequest.Dir, of the backend's
	// state files. Restore needs all of them.
	Files []string
	// Pause is how long the guest did not run (from the pause to the
	// resume, or to the end of the snapshot with KeepPaused).
	Pause time.Duration
	// Version is the monitor that wrote the state (see Snapshotter.Version).
	Version string
	// Accel is the accelerator the VM ran under ("kvm" or "tcg"): under
	// KVM the host CPU's features are part of the saved state.
	Accel string
}
