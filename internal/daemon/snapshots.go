package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/lifecycle"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/snapshot"
	"github.com/bangerdev/banger/internal/vmm"
)

// Snapshots: authorization and the HTTP surface. The mechanism is in
// internal/snapshot, the orchestration in internal/lifecycle/snapshot.go.
// A snapshot belongs to its creator: the same rules as for VMs apply, and
// another user's snapshot is reported as not found.

// visibleSnapshot returns the snapshot ref if the caller may see it.
func (d *Daemon) visibleSnapshot(r *http.Request, ref string) (snapshot.Snapshot, error) {
	snap, err := d.life.Snapshots().Get(ref)
	if err != nil {
		return snap, api.Errorf(api.CodeNotFound, "%v", err)
	}
	c := CallerFrom(r.Context())
	if !c.Root() && snap.Owner != c.UID {
		return snapshot.Snapshot{}, api.Errorf(api.CodeNotFound, "snapshot %q (see banger snapshot ls): %v", ref, snapshot.ErrNotFound)
	}
	return snap, nil
}

func snapshotView(s snapshot.Snapshot, inUse []string) api.Snapshot {
	v := api.Snapshot{ID: s.ID, Name: s.Name, OwnerUID: s.Owner, Created: s.CreatedAt, SourceVM: s.Source.VMName,
		Machine: api.SnapshotMachine{
			Monitor: s.Machine.Monitor, MonitorVersion: s.Machine.MonitorVersion, Accel: s.Machine.Accel,
			Kernel: s.Machine.KernelName, Image: s.Machine.Image, CPUs: s.Machine.CPUs, MemoryMiB: s.Machine.MemoryMiB,
			Devices: s.Machine.Devices, MAC: s.Machine.MAC, IP: s.Machine.IP, Hostname: s.Machine.Hostname,
		},
		Size: s.Size(), SizeOnDisk: s.SizeOnDisk(), Pause: s.Pause, Mounts: s.Mounts, InUseBy: inUse}
	for _, f := range s.Files {
		v.Files = append(v.Files, api.SnapshotFile{Name: f.Name, Role: f.Role, Size: f.Size, SizeOnDisk: f.Blocks, SHA256: f.SHA256})
	}
	return v
}

func (d *Daemon) handleSnapshotList(w http.ResponseWriter, r *http.Request) {
	all, err := d.life.Snapshots().List()
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	c := CallerFrom(r.Context())
	out := []api.Snapshot{}
	for _, s := range all {
		if c.Root() || s.Owner == c.UID {
			out = append(out, snapshotView(s, d.life.InUseAs(s, c.UID)))
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) handleSnapshotGet(w http.ResponseWriter, r *http.Request) {
	snap, err := d.visibleSnapshot(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, snapshotView(snap, d.life.InUseAs(snap, CallerFrom(r.Context()).UID)))
}

func (d *Daemon) handleSnapshotDelete(w http.ResponseWriter, r *http.Request) {
	snap, err := d.visibleSnapshot(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	force := r.URL.Query().Get("force") == "true"
	uid := CallerFrom(r.Context()).UID
	removed, err := d.life.Snapshots().Remove(snap.ID, force, func(s snapshot.Snapshot) []string { return d.life.InUseAs(s, uid) })
	if err != nil {
		if errors.Is(err, snapshot.ErrInUse) {
			err = api.Errorf(api.CodeConflict, "%v", err)
		}
		d.writeError(w, r, err)
		return
	}
	d.log.Info("snapshot removed", "snapshot", removed.Name, "force", force)
	writeJSON(w, http.StatusOK, snapshotView(removed, nil))
}

// handleVMSnapshot saves a running VM: POST /v1/vms/{name}/snapshot.
func (d *Daemon) handleVMSnapshot(w http.ResponseWriter, r *http.Request) {
	var req api.SnapshotVMRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	if err := snapshot.ValidateName(req.Name); err != nil {
		d.writeError(w, r, api.Errorf(api.CodeInvalid, "%v", err))
		return
	}
	caller := CallerFrom(r.Context())
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		// The VM's --mount folders, from its record, are refused unless
		// req.Force (lifecycle).
		snap, after, err := d.life.Snapshot(ctx, vm.ID, lifecycle.SnapshotRequest{Name: req.Name, Owner: caller.UID, Stop: req.Stop, Force: req.Force}, report)
		if err != nil {
			return nil, err
		}
		return api.SnapshotVMResult{Snapshot: snapshotView(snap, nil), VM: api.ViewOf(after, caller.Root())}, nil
	})
}

// handleSnapshotClone makes a new VM from a snapshot:
// POST /v1/snapshots/{name}/clone.
func (d *Daemon) handleSnapshotClone(w http.ResponseWriter, r *http.Request) {
	var req api.CloneRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	snap, err := d.visibleSnapshot(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	caller := CallerFrom(r.Context())
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return vmOp(r, func() (model.VM, error) { return d.life.Clone(ctx, snap, req.Name, caller.UID, req.Wait, report) })
	})
}

// startFromSnapshot is vm start --from-snapshot: the caller must see both
// the VM and the snapshot.
func (d *Daemon) startFromSnapshot(w http.ResponseWriter, r *http.Request, vm model.VM, req api.StartVMRequest) {
	snap, err := d.visibleSnapshot(r, req.FromSnapshot)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return vmOp(r, func() (model.VM, error) { return d.life.StartFromSnapshot(ctx, vm.ID, snap, req.Wait, report) })
	})
}

// recoverSnapshots is the start-up recovery of snapshots: the store removes
// every snapshot that was not finished, and a VM left paused by an
// interrupted snapshot is resumed.
func (d *Daemon) recoverSnapshots(ctx context.Context) error {
	left, err := d.life.Snapshots().Reconcile()
	for _, l := range left {
		d.log.Info("removed an unfinished snapshot", "entry", l.Entry)
		if l.Snapshot == nil || l.Snapshot.Phase != snapshot.PhaseCreating {
			continue
		}
		vm, gerr := d.store.GetVM(l.Snapshot.Source.VMID)
		if gerr != nil || vm.Runtime.Monitor.PID == 0 {
			continue
		}
		mon, merr := d.life.Monitor(vm.VMM)
		if merr != nil {
			continue
		}
		if sn, ok := mon.(vmm.Snapshotter); ok {
			if rerr := sn.Resume(ctx, vm.Runtime.Monitor); rerr != nil && !errors.Is(rerr, vmm.ErrNotRunning) {
				err = errors.Join(err, fmt.Errorf("resume VM %q after an interrupted snapshot: %w", vm.Name, rerr))
				continue
			}
			d.log.Info("resumed the VM of an interrupted snapshot", "vm", vm.Name)
		}
	}
	return err
}
