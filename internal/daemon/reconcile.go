package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/vmm"
)

func init() {
	recoverers = append(recoverers, reconcileVMs, scanOrphans)
}

// bootIDOverride lets tests simulate a host reboot.
var bootIDOverride = os.Getenv("BANGER_TEST_BOOT_ID")

func currentBootID() string {
	if bootIDOverride != "" {
		return bootIDOverride
	}
	id, _ := vmm.BootID()
	return id
}

// loadHandles reads a VM's handles.json. It returns false when the file is
// missing, empty, truncated, not JSON or written for another VM.
func (d *Daemon) loadHandles(vmID string) (model.Runtime, bool) {
	raw, err := os.ReadFile(d.handlesPath(vmID))
	if err != nil || len(raw) == 0 {
		return model.Runtime{}, false
	}
	var h Handles
	if err := json.Unmarshal(raw, &h); err != nil || h.VMID != vmID {
		return model.Runtime{}, false
	}
	return h.Runtime, true
}

// recoveryRuntime picks the teardown identity of a VM: handles.json when it
// is usable and agrees with the store; the store's VM.Runtime otherwise
// (the store wins on disagreement). Every resource is verified again
// before anything is removed, whichever source named it.
func (d *Daemon) recoveryRuntime(vm model.VM) (model.Runtime, string) {
	h, ok := d.loadHandles(vm.ID)
	switch {
	case !ok:
		return vm.Runtime, "store (handles.json missing or unusable)"
	case vm.Runtime.Empty():
		return h, "handles.json"
	case h.PID != vm.Runtime.PID || h.Tap != vm.Runtime.Tap || h.DMName != vm.Runtime.DMName || h.COWPath != vm.Runtime.COWPath:
		return vm.Runtime, "store (handles.json disagrees)"
	default:
		return h, "handles.json"
	}
}

// reconcileVMs runs at start-up: VMs whose monitor still runs (and is the
// process banger started, in this boot) are re-adopted; the others are
// stopped and their resources released. After a host reboot every VM is
// stopped.
func reconcileVMs(ctx context.Context, d *Daemon) error {
	start := time.Now()
	vms, err := d.store.ListVMs(nil)
	if err != nil {
		return err
	}
	boot := currentBootID()
	var adopted, cleaned int
	for _, vm := range vms {
		if vm.Runtime.Empty() && !hasHandles(d, vm.ID) {
			switch vm.State {
			case model.VMStarting, model.VMStopping, model.VMRunning:
				_, _ = d.setState(vm.ID, model.VMStopped, "", nil)
			}
			continue
		}
		rt, source := d.recoveryRuntime(vm)
		vm.Runtime = rt
		log := d.log.With("vm", vm.Name, "id", vm.ID, "source", source)
		if rt.PID != 0 && rt.BootID == boot && (vm.State == model.VMRunning || vm.State == model.VMStarting) {
			if mon, err := d.monitor(vm.VMM); err == nil {
				h := handleOf(rt)
				if alive, _ := mon.Alive(h); alive {
					rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
					err := mon.Reattach(rctx, h)
					cancel()
					if err == nil {
						vm, err = d.store.UpdateVM(vm.ID, func(v *model.VM) error {
							v.Runtime = rt
							v.Recovery.ReadoptedAt = time.Now().UTC()
							return nil
						})
						if err == nil {
							_ = d.writeHandles(vm)
							d.watch(vm)
							adopted++
							log.Info("re-adopted running VM", "pid", rt.PID)
							continue
						}
					}
					log.Warn("VM monitor runs but does not answer; stopping it", "err", err)
				}
			}
		}
		why := "its VM monitor is gone"
		if rt.BootID != "" && rt.BootID != boot {
			why = "the host rebooted"
		}
		removed, rerr := d.releaseRuntime(ctx, vm, false)
		st, reason := model.VMStopped, ""
		if rerr != nil {
			st, reason = model.VMError, "cleanup after restart failed: "+rerr.Error()
		}
		_, _ = d.setState(vm.ID, st, reason, func(v *model.VM) {
			v.Recovery.CleanedAt, v.Recovery.Removed = time.Now().UTC(), removed
			if rerr == nil {
				v.Runtime = model.Runtime{ConsoleLog: v.Runtime.ConsoleLog}
			}
		})
		cleaned++
		log.Info("VM stopped at start-up: "+why, "removed", strings.Join(removed, ", "), "err", rerr)
	}
	if adopted+cleaned > 0 {
		d.log.Info("reconciled VMs", "adopted", adopted, "cleaned", cleaned, "duration", time.Since(start).Round(time.Millisecond))
	}
	d.releaseNetworkIfIdle(ctx)
	return nil
}

func hasHandles(d *Daemon, id string) bool {
	_, err := os.Stat(d.handlesPath(id))
	return err == nil
}

// scanOrphans removes resources that carry banger's identity but belong to
// no VM record: taps named bgr-* with a banger: alias, loop devices backed
// by files under the state dir, BANGER-* dm devices, and runtime dirs of
// unknown VMs. Nothing else is touched. One log line each.
func scanOrphans(ctx context.Context, d *Daemon) error {
	vms, err := d.store.ListVMs(nil)
	if err != nil {
		return err
	}
	known := map[string]model.VM{}
	inUse := map[string]bool{} // backing files, tap names, dm names in use
	for _, vm := range vms {
		known[vm.ID] = vm
		rt := vm.Runtime
		inUse["tap:"+rt.Tap] = rt.Tap != ""
		inUse["dm:"+rt.DMName] = rt.DMName != ""
		for _, l := range rt.Loops {
			inUse["loop:"+l.BackingFile] = true
		}
	}
	var errs []error
	if taps, err := netctl.ListTaps(ctx); err == nil {
		for _, t := range taps {
			if inUse["tap:"+t.Name] {
				continue
			}
			if vm, ok := known[t.VMID]; ok && vm.Runtime.Tap == t.Name {
				continue
			}
			if err := netctl.DeleteTap(ctx, t.Name, t.VMID); err != nil {
				errs = append(errs, err)
				continue
			}
			d.log.Info("removed orphan tap", "tap", t.Name, "alias", t.Alias)
		}
	}
	disks := d.disks()
	if _, err := os.Stat("/dev/mapper/control"); err == nil {
		if devs, err := disks.ListDM(ctx); err == nil {
			for _, dev := range devs {
				if !strings.HasPrefix(dev.UUID, "BANGER-") || inUse["dm:"+dev.Name] {
					continue
				}
				vmID := strings.TrimPrefix(dev.UUID, "BANGER-")
				if err := disks.Deactivate(ctx, blockdev.Disk{DMName: dev.Name, DMUUID: dev.UUID}); err != nil {
					errs = append(errs, fmt.Errorf("orphan dm %s: %w", dev.Name, err))
					continue
				}
				d.log.Info("removed orphan dm device", "dm", dev.Name, "vm_id", vmID)
			}
		}
	}
	backings, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, b := range backings {
		raw, err := os.ReadFile(b)
		if err != nil {
			continue
		}
		file := strings.TrimSuffix(strings.TrimSpace(string(raw)), " (deleted)")
		if !under(d.cfg.StateDir, file) || inUse["loop:"+file] {
			continue
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(b)))
		if err := blockdev.DetachLoop(ctx, dev, file, d.cfg.StateDir); err != nil {
			errs = append(errs, fmt.Errorf("orphan loop %s: %w", dev, err))
			continue
		}
		d.log.Info("removed orphan loop device", "loop", dev, "backing_file", file)
	}
	if ents, err := os.ReadDir(filepath.Join(d.cfg.RuntimeDir, "vms")); err == nil {
		for _, e := range ents {
			if _, ok := known[e.Name()]; ok {
				continue
			}
			p := filepath.Join(d.cfg.RuntimeDir, "vms", e.Name())
			if err := d.removeUnder(filepath.Join(d.cfg.RuntimeDir, "vms"), p); err == nil {
				d.log.Info("removed orphan runtime dir", "dir", p)
			}
		}
	}
	if ents, err := os.ReadDir(d.cfg.VMsDir()); err == nil {
		for _, e := range ents {
			if _, ok := known[e.Name()]; ok {
				continue
			}
			p := filepath.Join(d.cfg.VMsDir(), e.Name())
			if err := d.removeUnder(d.cfg.VMsDir(), p); err == nil {
				d.log.Info("removed orphan VM dir (a create that crashed)", "dir", p)
			}
		}
	}
	if len(errs) > 0 {
		d.log.Warn("orphan scan could not remove everything", "err", errors.Join(errs...))
	}
	return nil
}

// under reports whether path is strictly inside dir.
func under(dir, path string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel)
}
