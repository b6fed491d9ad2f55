package lifecycle

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/failpoint"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/snapshot"
	"github.com/bangerdev/banger/internal/supervisor"
	"github.com/bangerdev/banger/internal/vmm"
)

// PhaseIdentity marks a VM restored from a snapshot whose guest has not yet
// applied its identity (clock, random seed, and for a clone MAC, IP,
// hostname, machine-id and SSH host keys). Its supervisor applies it
// before the VM is marked running, also after a daemon restart.
const PhaseIdentity = "identity:pending"

// Snapshots is the snapshot store the service saves to and restores from.
func (s *Service) Snapshots() *snapshot.Store { return s.snaps }

// snapshotter returns the VM monitor of vm as a vmm.Snapshotter.
func (s *Service) snapshotter(vm model.VM) (vmm.Snapshotter, error) {
	mon, err := s.Monitor(vm.VMM)
	if err != nil {
		return nil, err
	}
	sn, ok := mon.(vmm.Snapshotter)
	if !ok {
		return nil, api.Errorf(api.CodeInvalid, "VM %q runs under %s, which cannot take snapshots: %v", vm.Name, vm.VMM, vmm.ErrNotSupported)
	}
	return sn, nil
}

// SnapshotRequest is what Snapshot needs besides the VM.
type SnapshotRequest struct {
	Name  string
	Owner uint32
	Stop  bool // stop the VM once it is saved
	Force bool // save a VM that has --mount folders (recorded on the VM)
}

// Snapshot saves the running VM id whole (memory, devices and disk) as the
// snapshot req.Name owned by req.Owner, and then stops the VM when
// req.Stop. The VM is paused only while its state is written and its disk
// copied.
func (s *Service) Snapshot(ctx context.Context, id string, req SnapshotRequest, report progress.Func) (snapshot.Snapshot, model.VM, error) {
	mu := s.Lock(id)
	mu.Lock()
	vm, err := s.store.GetVM(id)
	if err != nil {
		mu.Unlock()
		return snapshot.Snapshot{}, vm, err
	}
	snap, err := s.takeLocked(ctx, vm, req, report)
	mu.Unlock()
	if err != nil || !req.Stop {
		return snap, vm, err
	}
	vm, err = s.Stop(context.WithoutCancel(ctx), id, report)
	return snap, vm, err
}

func (s *Service) takeLocked(ctx context.Context, vm model.VM, req SnapshotRequest, report progress.Func) (snapshot.Snapshot, error) {
	if vm.State != model.VMRunning {
		return snapshot.Snapshot{}, api.Errorf(api.CodeConflict, "VM %q is %s: only a running VM can be saved (banger vm start %s)", vm.Name, vm.State, vm.Name)
	}
	sn, err := s.snapshotter(vm)
	if err != nil {
		return snapshot.Snapshot{}, err
	}
	if vm.Runtime.Disk.Driver == blockdev.DriverDMSnapshot {
		return snapshot.Snapshot{}, api.Errorf(api.CodeInvalid, "VM %q has a dm-snapshot disk: snapshots need a file disk (disk driver reflink or copy)", vm.Name)
	}
	kernel, initrd, err := s.bootArtifacts(vm)
	if err != nil {
		return snapshot.Snapshot{}, err
	}
	devices := []string{"disk: virtio-blk " + vm.DiskDriver, "agent: " + vm.Runtime.Monitor.AgentTransport}
	if vm.Runtime.Tap.Name != "" {
		devices = append(devices, "net: virtio-net "+vm.MAC)
	}
	var folders []string
	for _, m := range vm.Mounts {
		folders = append(folders, m.String())
	}
	snap, err := s.snaps.Take(ctx, snapshot.TakeParams{
		Name: req.Name, Owner: req.Owner,
		Source: snapshot.Source{VMID: vm.ID, VMName: vm.Name},
		Machine: snapshot.Machine{
			Monitor: vm.VMM, Kernel: kernel, KernelName: vm.Kernel, Initrd: initrd, Cmdline: vm.KernelCmdline, Image: vm.Image,
			CPUs: vm.CPUs, MemoryMiB: vm.MemoryMiB, Devices: devices, MAC: vm.MAC, IP: vm.IP, Hostname: vm.Name,
		},
		Monitor: sn, Handle: vm.Runtime.Monitor, Disk: vm.Runtime.Disk.Path,
		Mounts: folders, Force: req.Force,
		Progress: func(step string) { report.Report(progress.Event{Phase: "snapshot", Item: req.Name, Message: step}) },
	})
	if err != nil {
		return snap, snapshotError(err)
	}
	s.log.Info("snapshot taken", "vm", vm.Name, "snapshot", snap.Name, "pause", snap.Pause, "bytes", snap.SizeOnDisk())
	report.Report(progress.Event{Phase: "snapshot", Item: snap.Name, Done: true,
		Message: fmt.Sprintf("VM paused %s", snap.Pause.Round(time.Millisecond))})
	return snap, nil
}

// snapshotError gives the snapshot package's errors their API codes.
func snapshotError(err error) error {
	switch {
	case errors.Is(err, snapshot.ErrNotFound):
		return api.Errorf(api.CodeNotFound, "%v", err)
	case errors.Is(err, snapshot.ErrExists), errors.Is(err, snapshot.ErrInUse):
		return api.Errorf(api.CodeConflict, "%v", err)
	case errors.Is(err, snapshot.ErrInvalidName), errors.Is(err, snapshot.ErrHasMounts),
		errors.Is(err, snapshot.ErrIncompatible), errors.Is(err, snapshot.ErrCorrupt):
		return api.Errorf(api.CodeInvalid, "%v", err)
	}
	return err
}

// StartFromSnapshot starts the stopped VM id from a snapshot instead of
// booting it: its disk becomes a copy of the snapshot's, the monitor loads
// the saved memory and devices, and the guest steps its clock and
// reseeds its random pool before the VM is running. A clone (a VM other
// than the one saved) also gets its own MAC, IP, hostname, machine-id and
// SSH host keys.
func (s *Service) StartFromSnapshot(ctx context.Context, id string, snap snapshot.Snapshot, wait bool, report progress.Func) (model.VM, error) {
	vm, err := s.store.GetVM(id)
	if err != nil {
		return vm, err
	}
	sn, err := s.snapshotter(vm)
	if err != nil {
		return vm, err
	}
	if vm.CPUs != snap.Machine.CPUs || vm.MemoryMiB != snap.Machine.MemoryMiB || vm.VMM != snap.Machine.Monitor {
		return vm, api.Errorf(api.CodeInvalid, "VM %q (%d vCPUs, %d MiB, %s) cannot run snapshot %q (%d vCPUs, %d MiB, %s): use banger vm clone %s",
			vm.Name, vm.CPUs, vm.MemoryMiB, vm.VMM, snap.Name, snap.Machine.CPUs, snap.Machine.MemoryMiB, snap.Machine.Monitor, snap.Name)
	}
	// Refuse before anything changes: the VM's disk is replaced below.
	if err := s.checkSnapshot(ctx, snap, sn, report); err != nil {
		return vm, err
	}
	restore := &restoreRun{snap: snap, sn: sn}
	return s.restoreStart(ctx, vm, restore, restore.disk(s), wait, report)
}

// checkSnapshot refuses a snapshot this host cannot restore or whose files
// fail their checksums.
func (s *Service) checkSnapshot(ctx context.Context, snap snapshot.Snapshot, sn vmm.Snapshotter, report progress.Func) error {
	report.Report(progress.Event{Phase: "snapshot", Item: snap.Name, Message: "checking the host and the snapshot's checksums"})
	if err := snapshot.CheckHost(ctx, snap, snap.Machine.Monitor, sn); err != nil {
		return snapshotError(err)
	}
	if err := s.snaps.Verify(ctx, snap); err != nil {
		return snapshotError(err)
	}
	return nil
}

// restoreStart is the start of vm from a checked snapshot. disk is the
// step that gives it its disk: a copy of the snapshot's for a restore into
// the same VM, the disk made at create for a clone (prepareDisk).
func (s *Service) restoreStart(ctx context.Context, vm model.VM, restore *restoreRun, disk startStep, wait bool, report progress.Func) (model.VM, error) {
	mu := s.Lock(vm.ID)
	mu.Lock()
	run, err := s.beginStart(ctx, vm.ID, "")
	if err != nil {
		mu.Unlock()
		return run.vm, err
	}
	run.kernel, run.initrd = restore.snap.Machine.Kernel, restore.snap.Machine.Initrd
	sup, err := s.runStart(ctx, run, report, disk, s.attachNetwork, restore.monitor(s))
	mu.Unlock()
	if err != nil || !wait {
		return run.vm, err
	}
	return s.waitReady(ctx, run.vm, sup, report)
}

// restoreRun is what the steps of a start from a snapshot share.
type restoreRun struct {
	snap snapshot.Snapshot
	sn   vmm.Snapshotter
}

// disk replaces the VM's disk with a copy of the snapshot's, recorded
// first: the copy is made beside it and renamed over it when whole; its
// flush runs in the background (copyDiskUnflushed).
func (r *restoreRun) disk(s *Service) startStep {
	return func(ctx context.Context, run *startRun, report progress.Func) error {
		vm := run.vm
		report.Report(progress.Event{Phase: "disk", Item: vm.Name, Message: "copying the snapshot's disk"})
		dst := filepath.Join(s.VMDir(vm.ID), blockdev.DiskFileName)
		disk := blockdev.Disk{Driver: vm.DiskDriver, Path: dst, COWPath: dst}
		if err := run.record(s.setRuntime(vm.ID, func(rt *model.Runtime) { rt.Phase, rt.Disk = "disk:creating", disk })); err != nil {
			return err
		}
		s.cancelDiskFlush(vm.ID) // a clone's fresh copy must not land over the restored disk
		began := time.Now()
		how, err := s.copyDiskUnflushed(ctx, filepath.Join(s.snaps.Path(r.snap), snapshot.DiskFileName), dst)
		if err != nil {
			return fmt.Errorf("restore disk from snapshot %q: %w", r.snap.Name, err)
		}
		// The disk was recorded whole before the copy; its rename into
		// place changes nothing the record holds, so no second commit.
		run.disk = disk
		run.log.Debug("disk copied from snapshot", "snapshot", r.snap.Name, "how", how, "took", time.Since(began).Round(time.Millisecond))
		report.Report(progress.Event{Phase: "disk", Item: vm.Name, Done: true, Message: how})
		failpoint.Reach("restore:disk")
		return nil
	}
}

// monitor launches the monitor from the snapshot's state and records it,
// with the VM's identity still to apply.
func (r *restoreRun) monitor(s *Service) startStep {
	return func(ctx context.Context, run *startRun, report progress.Func) error {
		vm := run.vm
		report.Report(progress.Event{Phase: "vmm", Item: vm.VMM, Message: "loading the saved memory and devices"})
		spec, err := s.monitorSpec(run)
		if err != nil {
			return err
		}
		began := time.Now()
		h, err := r.sn.Restore(ctx, spec, s.snaps.Path(r.snap))
		loaded := time.Since(began)
		if err != nil {
			return fmt.Errorf("restore %s from snapshot %q: %w", vm.VMM, r.snap.Name, err)
		}
		failpoint.Reach("restore:vmm")
		// The monitor and the identity still to apply, in one update.
		restored := func(v *model.VM) { v.Runtime.Phase, v.RestoredFrom = PhaseIdentity, r.snap.ID }
		if err := run.record(s.confirmMonitor(vm.ID, h, spec, restored)); err != nil {
			_, _ = run.mon.Stop(context.WithoutCancel(ctx), h, 0)
			return fmt.Errorf("record the VM monitor: %w", err)
		}
		run.log.Info("VM restored from snapshot", "snapshot", r.snap.Name, "pid", h.PID, "load", loaded.Round(time.Millisecond), "overhead", time.Since(run.began).Round(time.Millisecond), "steps", run.took)
		report.Report(progress.Event{Phase: "vmm", Item: vm.VMM, Done: true, Message: fmt.Sprintf("pid %d, restored", h.PID)})
		return nil
	}
}

// identityWait is the boot waiter of a VM restored from a snapshot: it has
// the guest agent apply the VM's identity and records the VM as running
// with its (new) host key, or moves it to error.
func (s *Service) identityWait(ctx context.Context, sup *supervisor.Supervisor) error {
	vm := sup.VM()
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	err := s.applyIdentity(wctx, vm, sup)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err == nil {
		return nil
	}
	mu := s.Lock(vm.ID)
	mu.Lock()
	defer mu.Unlock()
	cur, gerr := s.store.GetVM(vm.ID)
	if gerr != nil || cur.State != model.VMStarting || cur.Runtime.Monitor.PID != vm.Runtime.Monitor.PID {
		return err
	}
	reason := fmt.Sprintf("the restored guest did not take its identity: %v", err)
	s.log.Warn("restored VM not ready; stopping it", "vm", vm.Name, "err", err)
	s.sups.Remove(vm.ID, sup)
	sup.Detach()
	_, _ = s.ReleaseAndMark(s.bg, cur, sup, Mark{State: model.VMError, Reason: reason, Failed: func(err error) string {
		return reason + "; cleanup: " + err.Error()
	}})
	sup.Close()
	return errors.New(reason)
}

func (s *Service) applyIdentity(ctx context.Context, vm model.VM, sup *supervisor.Supervisor) error {
	snap, err := s.snapshotOf(vm)
	if err != nil {
		return err
	}
	nc, err := s.NetConfig()
	if err != nil {
		return err
	}
	seed := make([]byte, 64)
	_, _ = rand.Read(seed)
	id := agent.Identity{Seed: seed}
	clone := vm.ID != snap.Source.VMID
	if clone {
		id.OldMAC, id.MAC, id.Hostname = snap.Machine.MAC, vm.MAC, vm.Name
		id.MachineID, id.NewHostKeys = agent.NewMachineID(), true
		// The host makes the new host key: natively it takes no time, in
		// the just-restored emulated guest it took 50-100 ms.
		if id.HostKey, _, err = agent.NewHostKey(); err != nil {
			return fmt.Errorf("make the clone's host key: %w", err)
		}
		if vm.IP != "" {
			id.Address, id.Gateway = fmt.Sprintf("%s/%d", vm.IP, nc.Subnet.Bits()), nc.Gateway().String()
		}
	}
	var res *agent.IdentityResult
	began := time.Now()
	var session, applied time.Duration // the last attempt's
	attempt := 0
	for ; ; attempt++ {
		t0 := time.Now()
		c, err := sup.Session(ctx)
		session = time.Since(t0)
		if err == nil {
			id.HostTime = time.Now().UnixNano()
			t1 := time.Now()
			res, err = c.SetIdentity(ctx, id)
			applied = time.Since(t1)
			if err == nil {
				break
			}
			sup.DropSession(c)
			if errors.Is(err, agent.ErrUnknownOp) || errors.Is(err, agent.ErrInvalidArgument) {
				return fmt.Errorf("the guest agent cannot apply an identity (rebuild the image with this banger's agent): %w", err)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %w)", ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	hostKey := vm.HostKey
	if res.HostKey != "" {
		if _, _, err := agent.ParseAuthorizedKeyLine(res.HostKey); err != nil {
			return fmt.Errorf("the guest's new host key: %w", err)
		}
		hostKey = strings.TrimSpace(res.HostKey)
	}
	_, err = s.store.UpdateVM(vm.ID, func(v *model.VM) error {
		if v.State == model.VMStarting {
			v.State = model.VMRunning
		}
		v.Runtime.Phase, v.HostKey, v.FirstBoot = "running", hostKey, string(agent.FirstBootDone)
		return nil
	})
	if err == nil {
		s.log.Info("restored VM ready", "vm", vm.Name, "snapshot", snap.Name, "clone", clone, "applied", res.Applied, "guest_took", stepTimes(res), "clock_step", res.ClockStep,
			"attempts", attempt+1, "session", session.Round(time.Millisecond), "identity", applied.Round(time.Millisecond), "took", time.Since(began).Round(time.Millisecond))
	}
	return err
}

// stepTimes is the guest's time for each identity step, in the order
// applied, for the log ("network=62ms ..."). It comes from the guest: only
// the steps it says it applied are shown.
func stepTimes(res *agent.IdentityResult) string {
	var b strings.Builder
	for _, name := range append(slices.Clone(res.Applied), "sync") {
		d, ok := res.Took[name]
		if !ok || len(name) > 32 {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s=%s", name, d.Round(time.Millisecond))
	}
	return b.String()
}

// snapshotOf returns the snapshot a restored VM came from.
func (s *Service) snapshotOf(vm model.VM) (snapshot.Snapshot, error) {
	snap, err := s.snaps.Get(vm.RestoredFrom)
	if err != nil {
		return snap, fmt.Errorf("VM %q was restored from snapshot %s, which is gone: %w", vm.Name, vm.RestoredFrom, err)
	}
	return snap, nil
}

// Clone creates the VM name owned by owner from a snapshot: a new record
// with its own IP and MAC and the snapshot's machine, its disk a copy of
// the snapshot's made at create (no image disk is built), started from
// the snapshot. The snapshot is checked before the VM is created, and a
// clone that fails to start is removed again: a failed clone leaves
// nothing.
func (s *Service) Clone(ctx context.Context, snap snapshot.Snapshot, name string, owner uint32, wait bool, report progress.Func) (model.VM, error) {
	mon, err := s.Monitor(snap.Machine.Monitor)
	if err != nil {
		return model.VM{}, err
	}
	sn, ok := mon.(vmm.Snapshotter)
	if !ok {
		return model.VM{}, api.Errorf(api.CodeInvalid, "VM monitor %s cannot restore snapshots: %v", snap.Machine.Monitor, vmm.ErrNotSupported)
	}
	began := time.Now()
	if err := s.checkSnapshot(ctx, snap, sn, report); err != nil {
		return model.VM{}, err
	}
	checked := time.Since(began)
	// The snapshot's --mount folders (saved with --force) are the clone's
	// too, checked again as the clone's owner; they are mounted from the
	// host once the clone is ready.
	vm, err := s.Create(ctx, api.CreateVMRequest{
		Name: name, Image: snap.Machine.Image, KernelRef: snap.Machine.KernelName, CPUs: snap.Machine.CPUs,
		Memory: fmt.Sprintf("%dM", snap.Machine.MemoryMiB), VMM: snap.Machine.Monitor, Mounts: snap.Mounts,
	}, owner, report, WithDiskFrom(filepath.Join(s.snaps.Path(snap), snapshot.DiskFileName)))
	if err != nil {
		return vm, err
	}
	s.log.Debug("clone created", "vm", vm.Name, "snapshot", snap.Name, "check", checked.Round(time.Millisecond), "took", time.Since(began).Round(time.Millisecond))
	out, err := s.restoreStart(ctx, vm, &restoreRun{snap: snap, sn: sn}, s.prepareDisk, wait, report)
	if err != nil && (out.State == model.VMError || out.State == model.VMCreated) {
		if _, derr := s.Delete(context.WithoutCancel(ctx), vm.ID, true); derr != nil {
			err = fmt.Errorf("%w; and removing the failed clone: %w", err, derr)
		}
	}
	return out, err
}

// InUse names the VMs that run from snap's files: Firecracker maps the
// snapshot's memory file for as long as a VM restored from it runs (QEMU
// reads its state once, at restore).
func (s *Service) InUse(snap snapshot.Snapshot) []string { return s.InUseAs(snap, 0) }

// InUseAs is InUse as seen by uid: another user's VM is not named (uid 0
// sees every name), only counted as "a VM of another user".
func (s *Service) InUseAs(snap snapshot.Snapshot, uid uint32) []string {
	vms, err := s.store.ListVMs(nil)
	if err != nil {
		return []string{"(cannot list VMs: " + err.Error() + ")"}
	}
	var names []string
	for _, vm := range vms {
		if vm.RestoredFrom == snap.ID && vm.VMM == "firecracker" && (vm.State == model.VMRunning || vm.State == model.VMStarting) {
			if uid != 0 && vm.OwnerUID != uid {
				names = append(names, "a VM of another user")
				continue
			}
			names = append(names, vm.Name)
		}
	}
	return names
}
