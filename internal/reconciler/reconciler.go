// Package reconciler brings the VM records in line with the host when the
// daemon starts: it finishes creates and deletes a dead daemon left half
// done, re-adopts VMs whose monitor still runs, releases what the others
// held, and then removes orphans — taps, loops, dm devices, monitor
// processes and dirs that carry banger's identity but belong to no record.
// It finds them through the listing functions of netctl, blockdev and vmm,
// and releases through package lifecycle, so that every resource is
// verified as the VM's own before it goes.
package reconciler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/lifecycle"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/subpath"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer"
)

// Reconciler runs start-up recovery for the VMs.
type Reconciler struct {
	Config config.Config
	Store  *store.Store
	Life   *lifecycle.Service
	Log    *slog.Logger
}

// bootIDOverride lets tests simulate a host reboot: the restarted daemon
// believes the boot id is this value (BANGER_TEST_BOOT_ID). It is atomic:
// a test sets it while goroutines of an earlier test's daemon may read it.
var bootIDOverride atomic.Pointer[string]

func init() {
	if id := os.Getenv("BANGER_TEST_BOOT_ID"); id != "" {
		bootIDOverride.Store(&id)
	}
}

func currentBootID() string {
	if id := bootIDOverride.Load(); id != nil && *id != "" {
		return *id
	}
	id, _ := vmm.BootID()
	return id
}

// recoveryRuntime picks the teardown identity of a VM: handles.json when it
// is usable and agrees with the store (or the store holds nothing), the
// store's VM.Runtime otherwise: the store wins on disagreement. Whichever
// source is chosen, OwnRuntime and the resource checks (tap alias, loop
// backing file, dm UUID, process identity) still run before anything is
// removed. The string says which source was used and why.
func (r *Reconciler) recoveryRuntime(vm model.VM) (model.Runtime, string) {
	h, err := r.Life.LoadHandles(vm.ID)
	switch {
	case err != nil:
		return vm.Runtime, "store (" + err.Error() + ")"
	case vm.Runtime.Empty():
		return h, "handles.json (the store holds no runtime)"
	case !h.SameIdentity(vm.Runtime):
		return vm.Runtime, "store (handles.json disagrees with it)"
	default:
		return h, "handles.json"
	}
}

// VMs runs at start-up:
//   - a create or delete the dead daemon left half done is finished (the
//     VM and everything it had are removed);
//   - a running or starting VM whose monitor still runs, and is the process
//     banger started in this boot, is re-adopted (a starting one resumes its
//     boot waiter);
//   - every other VM with runtime state is stopped and its resources
//     released; after a host reboot (another boot id) that is every VM;
//   - monitor processes of a VM that the record does not name (a start
//     that died before recording the pid) are killed.
func (r *Reconciler) VMs(ctx context.Context) error {
	start := time.Now()
	vms, err := r.Store.ListVMs(nil)
	if err != nil {
		return err
	}
	boot := currentBootID()
	procs := r.monitorProcs()
	// VMs are independent: reconcile several at once, so that one slow
	// monitor socket or disk flush does not hold up the others.
	var mu sync.Mutex
	counts := map[outcome]int{}
	work := make(chan model.VM)
	var wg sync.WaitGroup
	for range min(workers, len(vms)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for vm := range work {
				o := r.reconcileVM(ctx, vm, boot, procs[vm.ID])
				mu.Lock()
				counts[o]++
				mu.Unlock()
			}
		}()
	}
	for _, vm := range vms {
		work <- vm
	}
	close(work)
	wg.Wait()
	r.Log.Info("reconciled VMs", "vms", len(vms), "adopted", counts[adopted], "cleaned", counts[cleaned],
		"removed", counts[removedVM], "failed", counts[failed], "duration", time.Since(start).Round(time.Microsecond))
	return nil
}

// workers is how many VMs start-up reconciles at once.
const workers = 8

// outcome is what start-up did with one VM.
type outcome int

const (
	untouched outcome = iota
	adopted
	cleaned
	removedVM
	failed
)

// reconcileVM brings one VM record in line with the host at start-up;
// procs are the monitor processes found naming the VM's runtime dir.
func (r *Reconciler) reconcileVM(ctx context.Context, vm model.VM, boot string, procs []vmm.Handle) outcome {
	log := r.Log.With("vm", vm.Name, "id", vm.ID)
	if vm.Runtime.Phase == lifecycle.PhaseDeleting || (vm.State == model.VMCreated && vm.Runtime.Phase != "") {
		return r.finishInterrupted(ctx, vm, procs, log)
	}
	if vm.Runtime.Empty() && len(procs) == 0 && !r.Life.HasHandles(vm.ID) {
		switch vm.State {
		case model.VMStarting, model.VMStopping, model.VMRunning:
			_, _ = r.Life.SetState(vm.ID, model.VMStopped, "", nil)
			log.Info("VM stopped at start-up: it held no runtime state")
			return cleaned
		}
		return untouched
	}
	rt, source := r.recoveryRuntime(vm)
	rt, refused := r.Life.OwnRuntime(vm.ID, rt)
	for _, ref := range refused {
		log.Warn("start-up: refusing a resource the VM's record names but banger cannot prove it made", "refused", ref, "source", source)
	}
	vm.Runtime = rt
	log = log.With("source", source)
	if r.readopt(ctx, vm, boot, log) {
		if removed := r.killStrays(ctx, procs, rt.Monitor.PID); len(removed) > 0 {
			log.Warn("killed stray VM monitor processes", "removed", strings.Join(removed, ", "))
		}
		return adopted
	}
	why := "its VM monitor is gone"
	switch {
	case rt.Monitor.BootID != "" && rt.Monitor.BootID != boot:
		why = "the host rebooted"
	case vm.State == model.VMStopping:
		why = "it was stopping"
	case rt.Monitor.PID == 0:
		why = "its start had not finished"
	}
	strays := r.killStrays(ctx, procs, 0)
	out, rerr := r.Life.ReleaseAndMark(ctx, vm, nil, lifecycle.Mark{State: model.VMStopped, Also: strays, Failed: func(err error) string {
		return "cleanup after restart failed: " + err.Error()
	}})
	log.Info("VM stopped at start-up: "+why, "removed", strings.Join(out.Recovery.Removed, ", "), "err", rerr)
	if rerr != nil {
		return failed
	}
	return cleaned
}

// finishInterrupted removes a VM whose create or delete was interrupted:
// its devices, processes, disk, runtime dir, VM dir, record and lease.
func (r *Reconciler) finishInterrupted(ctx context.Context, vm model.VM, procs []vmm.Handle, log *slog.Logger) outcome {
	what := "finished the interrupted delete"
	if vm.Runtime.Phase != lifecycle.PhaseDeleting {
		what = "removed the VM of an interrupted create"
	}
	rt, source := r.recoveryRuntime(vm)
	vm.Runtime = rt
	removed, err := r.Life.Release(ctx, vm, true)
	removed = append(removed, r.killStrays(ctx, procs, 0)...)
	if err == nil {
		err = subpath.RemoveAll(r.Config.VMsDir(), r.Life.VMDir(vm.ID))
	}
	if err == nil {
		removed = append(removed, "VM dir "+r.Life.VMDir(vm.ID))
		err = r.Store.DeleteVM(vm.ID)
	}
	if err != nil {
		_, _ = r.Life.SetState(vm.ID, model.VMError, "removal after restart failed: "+err.Error(), nil)
		log.Error("start-up: cannot remove the VM of an interrupted create or delete", "err", err, "source", source)
		return failed
	}
	log.Info("start-up: "+what, "removed", strings.Join(removed, ", "), "source", source)
	return removedVM
}

// readopt takes a running or starting VM back when its monitor process is
// the one recorded (this boot, same start time and command line) and
// answers on its socket: the VM stays running, a starting one resumes its
// boot waiter. It reports whether the VM was re-adopted.
func (r *Reconciler) readopt(ctx context.Context, vm model.VM, boot string, log *slog.Logger) bool {
	rt := vm.Runtime
	h := rt.Monitor
	if h.PID == 0 || h.BootID != boot || (vm.State != model.VMRunning && vm.State != model.VMStarting) {
		return false
	}
	mon, err := r.Life.Monitor(vm.VMM)
	if err != nil {
		return false
	}
	if alive, _ := mon.Alive(h); !alive {
		return false
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = mon.Reattach(rctx, h)
	cancel()
	if err == nil {
		vm, err = r.Store.UpdateVM(vm.ID, func(v *model.VM) error {
			v.Runtime = rt
			v.Recovery.ReadoptedAt = time.Now().UTC()
			return nil
		})
	}
	if err == nil {
		err = r.Life.WriteHandles(vm)
	}
	if err != nil {
		log.Warn("VM monitor runs but cannot be re-adopted; stopping it", "pid", h.PID, "err", err)
		return false
	}
	r.Life.Supervise(vm)
	log.Info("re-adopted VM", "pid", h.PID, "state", vm.State)
	return true
}

// monitorProcs finds the VM monitor processes of this daemon's VMs: the
// configured firecracker or QEMU program with an argument naming a path
// inside <runtime_dir>/vms/<id>/, by VM id. It finds the monitors of starts
// that died before recording the pid.
func (r *Reconciler) monitorProcs() map[string][]vmm.Handle {
	return vmm.FindMonitors(r.Life.MonitorPrograms(), r.Life.RuntimeDirs())
}

// killStrays kills the monitor processes in procs other than keep with
// SIGKILL, each only if it still is the process identified, and returns
// what it removed.
func (r *Reconciler) killStrays(ctx context.Context, procs []vmm.Handle, keep int) []string {
	var removed []string
	for _, h := range procs {
		if h.PID == keep {
			continue
		}
		if err := vmm.Signal(h, syscall.SIGKILL); err != nil {
			if !errors.Is(err, vmm.ErrNotRunning) {
				r.Log.Warn("cannot kill stray VM monitor", "pid", h.PID, "err", err)
			}
			continue
		}
		vmm.WaitGone(ctx, h, 5*time.Second)
		removed = append(removed, fmt.Sprintf("stray monitor pid %d (%s)", h.PID, filepath.Base(h.Cmdline[0])))
	}
	return removed
}

// Orphans removes what carries banger's identity but belongs to no VM
// record, one log line each, and touches nothing else:
//   - taps named bgr-* with a banger: alias;
//   - loop devices backed by files under the state dir;
//   - BANGER-* dm devices;
//   - VM monitor processes naming an unknown VM's runtime dir;
//   - the banger nftables table when no VM runs;
//   - runtime dirs and VM dirs of unknown VMs, half-copied disks
//     (*.partial) in VM dirs, old disks a restore replaced and had not
//     freed yet (*.replaced; put back when the new one never took the
//     disk's name), and new disk copies whose flush the dead
//     daemon had not finished (*.unsynced: after a host crash they hold
//     whatever reached the disk; the VM's start copies the image again).
//
// Image staging dirs and pull scratch dirs are the image service's job.
func (r *Reconciler) Orphans(ctx context.Context) error {
	vms, err := r.Store.ListVMs(nil)
	if err != nil {
		return err
	}
	known := map[string]model.VM{}
	inUse := map[string]bool{} // backing files, tap names, dm names in use
	for _, vm := range vms {
		known[vm.ID] = vm
		rt := vm.Runtime
		inUse["tap:"+rt.Tap.Name] = rt.Tap.Name != ""
		inUse["dm:"+rt.Disk.DMName] = rt.Disk.DMName != ""
		for _, l := range rt.Disk.Loops {
			inUse["loop:"+l.BackingFile] = true
		}
	}
	r.orphanMonitors(ctx, known)
	errs := append(r.orphanTaps(ctx, known, inUse), r.orphanDM(ctx, inUse)...)
	errs = append(errs, r.orphanLoops(ctx, inUse)...)
	r.Life.ReleaseNetworkIfIdle(ctx)
	r.removeOrphanDirs(known)
	r.orphanJails(known)
	if len(errs) > 0 {
		r.Log.Warn("orphan scan could not remove everything", "err", errors.Join(errs...))
	}
	return nil
}

// orphanJails removes the Firecracker jails (chroot and cgroups) of VMs
// no record names, once no process runs in them (their monitors were
// killed by orphanMonitors, or are gone); a jail without banger's marker
// is left alone and logged.
func (r *Reconciler) orphanJails(known map[string]model.VM) {
	j := r.Config.Jailer()
	if j == nil {
		return
	}
	removed, refused := jailer.Stale(j.ChrootBase, func(id string) bool { _, ok := known[id]; return ok })
	for _, id := range removed {
		r.Log.Info("removed orphan Firecracker jail", "vm_id", id)
	}
	for _, err := range refused {
		r.Log.Warn("left a dir in the jailer's chroot base alone", "err", err)
	}
}

// orphanMonitors kills the monitor processes that name an unknown VM's
// runtime dir.
func (r *Reconciler) orphanMonitors(ctx context.Context, known map[string]model.VM) {
	for id, procs := range r.monitorProcs() {
		if _, ok := known[id]; ok {
			continue
		}
		for _, p := range r.killStrays(ctx, procs, 0) {
			r.Log.Info("removed orphan VM monitor", "vm_id", id, "process", p)
		}
	}
}

// orphanTaps removes banger's taps that no record names.
func (r *Reconciler) orphanTaps(ctx context.Context, known map[string]model.VM, inUse map[string]bool) []error {
	taps, err := netctl.ListTaps(ctx)
	if err != nil {
		return nil
	}
	var errs []error
	for _, t := range taps {
		if inUse["tap:"+t.Name] {
			continue
		}
		if vm, ok := known[t.VMID]; ok && vm.Runtime.Tap.Name == t.Name {
			continue
		}
		if err := netctl.DeleteTap(ctx, t.Name, t.VMID); err != nil {
			errs = append(errs, err)
			continue
		}
		r.Log.Info("removed orphan tap", "tap", t.Name, "alias", t.Alias)
	}
	return errs
}

// orphanDM removes BANGER-* dm devices that no record names.
func (r *Reconciler) orphanDM(ctx context.Context, inUse map[string]bool) []error {
	disks := r.Life.Disks()
	devs, err := disks.ListBangerDM(ctx)
	if err != nil {
		return nil
	}
	var errs []error
	for _, dev := range devs {
		if inUse["dm:"+dev.Name] {
			continue
		}
		if err := disks.Deactivate(ctx, blockdev.Disk{DMName: dev.Name, DMUUID: dev.UUID}); err != nil {
			errs = append(errs, fmt.Errorf("orphan dm %s: %w", dev.Name, err))
			continue
		}
		r.Log.Info("removed orphan dm device", "dm", dev.Name, "vm_id", dev.VMID)
	}
	return errs
}

// orphanLoops detaches loop devices backed by files under the state dir
// that no record names.
func (r *Reconciler) orphanLoops(ctx context.Context, inUse map[string]bool) []error {
	loops, err := blockdev.ListLoops()
	if err != nil {
		return nil
	}
	var errs []error
	for _, l := range loops {
		if !subpath.InsideResolved(r.Config.StateDir, l.BackingFile) || inUse["loop:"+l.BackingFile] {
			continue
		}
		if err := blockdev.DetachLoop(ctx, l.Device, l.BackingFile, r.Config.StateDir); err != nil {
			errs = append(errs, fmt.Errorf("orphan loop %s: %w", l.Device, err))
			continue
		}
		r.Log.Info("removed orphan loop device", "loop", l.Device, "backing_file", l.BackingFile)
	}
	return errs
}

// reconcileUnflushed applies the start-up rule to the disks in the VM dir
// dir that were written in place and whose flush the dead daemon had not
// finished (a disk restored from a snapshot, marked <disk>.unflushed): a
// disk written in this boot is whole in the page cache and is flushed now
// (a restored VM may still run on it); one written before the host went
// down is removed, and the VM says why (its next start copies the image
// again).
func (r *Reconciler) reconcileUnflushed(vm model.VM, dir string) {
	markers, _ := filepath.Glob(filepath.Join(dir, "*"+blockdev.UnflushedSuffix))
	for _, m := range markers {
		out, err := blockdev.ReconcileUnflushed(m, currentBootID())
		switch {
		case err != nil:
			r.Log.Warn("cannot settle a disk written without a flush", "marker", m, "err", err)
		case out == blockdev.UnflushedFlushed:
			r.Log.Info("flushed a disk the dead daemon had not flushed yet", "vm", vm.Name, "disk", strings.TrimSuffix(m, blockdev.UnflushedSuffix))
		default:
			reason := "the host went down before the disk restored from a snapshot was flushed: the disk was removed; " +
				"the next start copies the image again (or vm start --from-snapshot)"
			r.Log.Warn("removed a disk written without a flush before the host went down", "vm", vm.Name, "disk", strings.TrimSuffix(m, blockdev.UnflushedSuffix))
			if _, err := r.Store.UpdateVM(vm.ID, func(v *model.VM) error {
				if v.State != model.VMRunning && v.State != model.VMStarting {
					v.Reason = reason
				}
				return nil
			}); err != nil {
				r.Log.Warn("record the removed disk", "vm", vm.Name, "err", err)
			}
		}
	}
}

// removeOrphanDirs removes the runtime dirs and VM dirs of unknown VMs,
// and the half-copied disks of interrupted starts and the unflushed
// copies of interrupted creates in known VMs' dirs.
func (r *Reconciler) removeOrphanDirs(known map[string]model.VM) {
	rtDirs := r.Life.RuntimeDirs()
	if ents, err := os.ReadDir(rtDirs); err == nil {
		for _, e := range ents {
			if _, ok := known[e.Name()]; ok {
				continue
			}
			p := filepath.Join(rtDirs, e.Name())
			if err := subpath.RemoveAll(rtDirs, p); err == nil {
				r.Log.Info("removed orphan runtime dir", "dir", p)
			}
		}
	}
	if ents, err := os.ReadDir(r.Config.VMsDir()); err == nil {
		for _, e := range ents {
			p := filepath.Join(r.Config.VMsDir(), e.Name())
			if _, ok := known[e.Name()]; ok {
				partials, _ := filepath.Glob(filepath.Join(p, "*.partial"))
				for _, f := range partials {
					if err := os.Remove(f); err == nil {
						r.Log.Info("removed half-copied disk of an interrupted start", "file", f)
					}
				}
				// Before the unflushed rule: a disk put back here drops the
				// marker that was written for the copy replacing it.
				replaced, _ := filepath.Glob(filepath.Join(p, "*"+blockdev.ReplacedSuffix))
				for _, f := range replaced {
					disk := strings.TrimSuffix(f, blockdev.ReplacedSuffix)
					what, err := blockdev.RecoverReplaced(disk)
					switch {
					case err != nil:
						r.Log.Warn("start-up: cannot recover a disk a restore was replacing", "disk", disk, "err", err)
					case what != "":
						r.Log.Info("start-up: "+what, "disk", disk)
					}
				}
				r.reconcileUnflushed(known[e.Name()], p)
				unsynced, _ := filepath.Glob(filepath.Join(p, "*"+blockdev.UnsyncedSuffix))
				for _, f := range unsynced {
					if err := os.Remove(f); err == nil {
						r.Log.Info("removed a new disk copy whose flush had not finished; the VM's start copies the image again", "file", f)
					}
				}
				continue
			}
			if err := subpath.RemoveAll(r.Config.VMsDir(), p); err == nil {
				r.Log.Info("removed orphan VM dir (a create that crashed)", "dir", p)
			}
		}
	}
}
