package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/vmm"
)

// Phases of VM.Runtime that are not about a running VM: they mark a create
// or a delete in progress, so that start-up finishes what a dead daemon
// began.
const (
	phaseCreating = "creating" // createVM: record stored, disk not made yet
	phaseDeleting = "deleting" // deleteVM: removal under way
)

// bootIDOverride lets tests simulate a host reboot: the restarted daemon
// believes the boot id is this value (BANGER_TEST_BOOT_ID).
var bootIDOverride = os.Getenv("BANGER_TEST_BOOT_ID")

func currentBootID() string {
	if bootIDOverride != "" {
		return bootIDOverride
	}
	id, _ := vmm.BootID()
	return id
}

// loadHandles reads a VM's handles.json. The error says why the file cannot
// be used: missing, empty, truncated or not JSON, or written for another VM.
func (d *Daemon) loadHandles(vmID string) (model.Runtime, error) {
	raw, err := os.ReadFile(d.handlesPath(vmID))
	if errors.Is(err, fs.ErrNotExist) {
		return model.Runtime{}, errors.New("handles.json is missing")
	}
	if err != nil {
		return model.Runtime{}, fmt.Errorf("read handles.json: %w", err)
	}
	if len(strings.TrimSpace(string(raw))) == 0 {
		return model.Runtime{}, errors.New("handles.json is empty")
	}
	var h Handles
	if err := json.Unmarshal(raw, &h); err != nil {
		return model.Runtime{}, fmt.Errorf("handles.json is truncated or not JSON: %w", err)
	}
	if h.VMID != vmID {
		return model.Runtime{}, fmt.Errorf("handles.json was written for VM %q", h.VMID)
	}
	return h.Runtime, nil
}

// sameIdentity reports whether a and b name the same teardown identity:
// monitor process, sockets, tap, loops, dm device and disk files.
func sameIdentity(a, b model.Runtime) bool {
	return a.PID == b.PID && a.PIDStart == b.PIDStart && a.BootID == b.BootID && slices.Equal(a.Cmdline, b.Cmdline) &&
		a.RuntimeDir == b.RuntimeDir && a.APISocket == b.APISocket && a.AgentSocket == b.AgentSocket &&
		a.Tap == b.Tap && a.TapAlias == b.TapAlias && slices.Equal(a.Loops, b.Loops) &&
		a.DMName == b.DMName && a.DMUUID == b.DMUUID && a.COWPath == b.COWPath && a.BaseLink == b.BaseLink &&
		a.DiskPath == b.DiskPath
}

// recoveryRuntime picks the teardown identity of a VM: handles.json when it
// is usable and agrees with the store (or the store holds nothing), the
// store's VM.Runtime otherwise: the store wins on disagreement. Whichever
// source is chosen, ownRuntime and the resource checks (tap alias, loop
// backing file, dm UUID, process identity) still run before anything is
// removed. The string says which source was used and why.
func (d *Daemon) recoveryRuntime(vm model.VM) (model.Runtime, string) {
	h, err := d.loadHandles(vm.ID)
	switch {
	case err != nil:
		return vm.Runtime, "store (" + err.Error() + ")"
	case vm.Runtime.Empty():
		return h, "handles.json (the store holds no runtime)"
	case !sameIdentity(h, vm.Runtime):
		return vm.Runtime, "store (handles.json disagrees with it)"
	default:
		return h, "handles.json"
	}
}

var loopDevRE = regexp.MustCompile(`^/dev/loop[0-9]+$`)

// ownRuntime returns rt without every resource that cannot be this VM's by
// its name alone, and a description of each one dropped:
//   - a runtime dir other than the VM's own, sockets outside it;
//   - a tap not named TapName(id), or with an alias other than TapAlias(id);
//   - loops whose backing file is not inside the VM's dir;
//   - a dm device other than DMNames(id);
//   - disk files outside the VM's dir;
//   - a monitor pid whose recorded command line does not name the VM's
//     runtime dir (the process itself is checked again, start time, boot
//     id and command line, before any signal).
//
// Cleanup passes the result on; netctl and blockdev verify the survivors
// once more against the kernel (alias, backing file, dm UUID).
func (d *Daemon) ownRuntime(id string, rt model.Runtime) (model.Runtime, []string) {
	var refused []string
	rtDir, vmDir := d.vmRuntimeDir(id), d.vmDir(id)
	if rt.RuntimeDir != "" && filepath.Clean(rt.RuntimeDir) != rtDir {
		refused = append(refused, "runtime dir "+rt.RuntimeDir)
		rt.RuntimeDir = ""
	}
	for _, s := range []*string{&rt.APISocket, &rt.AgentSocket} {
		if *s != "" && !under(rtDir, *s) {
			refused = append(refused, "socket "+*s)
			*s = ""
		}
	}
	if rt.Tap != "" && (rt.Tap != netctl.TapName(id) || (rt.TapAlias != "" && rt.TapAlias != netctl.TapAlias(id))) {
		refused = append(refused, fmt.Sprintf("tap %q (alias %q)", rt.Tap, rt.TapAlias))
		rt.Tap, rt.TapAlias = "", ""
	}
	var loops []model.LoopDev
	for _, l := range rt.Loops {
		if (l.Device != "" && !loopDevRE.MatchString(l.Device)) || !underDir(vmDir, l.BackingFile) {
			refused = append(refused, fmt.Sprintf("loop %s backed by %q", l.Device, l.BackingFile))
			continue
		}
		loops = append(loops, l)
	}
	rt.Loops = loops
	dmName, dmUUID := blockdev.DMNames(id)
	if (rt.DMName != "" && rt.DMName != dmName) || (rt.DMUUID != "" && rt.DMUUID != dmUUID) {
		refused = append(refused, fmt.Sprintf("dm %q (uuid %q)", rt.DMName, rt.DMUUID))
		rt.DMName, rt.DMUUID = "", ""
	}
	for _, f := range []*string{&rt.COWPath, &rt.BaseLink} {
		if *f != "" && !underDir(vmDir, *f) {
			refused = append(refused, "disk file "+*f)
			*f = ""
		}
	}
	if rt.DiskPath != "" && !underDir(vmDir, rt.DiskPath) && rt.DiskPath != "/dev/mapper/"+dmName {
		refused = append(refused, "disk "+rt.DiskPath)
		rt.DiskPath = ""
	}
	if rt.PID != 0 && (rt.PID <= 1 || !namesDir(rt.Cmdline, rtDir)) {
		refused = append(refused, fmt.Sprintf("pid %d (%s)", rt.PID, strings.Join(rt.Cmdline, " ")))
		rt.PID, rt.PIDStart, rt.BootID, rt.Cmdline = 0, 0, "", nil
	}
	return rt, refused
}

// namesDir reports whether an argument of argv names a path inside dir.
func namesDir(argv []string, dir string) bool {
	for _, a := range argv {
		if strings.Contains(a, dir+"/") {
			return true
		}
	}
	return false
}

// underDir is under, also trying dir with its symlinks resolved (the form
// the kernel reports loop backing files in).
func underDir(dir, path string) bool {
	if path == "" || !filepath.IsAbs(path) {
		return false
	}
	path = filepath.Clean(path)
	if under(dir, path) {
		return true
	}
	if r, err := filepath.EvalSymlinks(dir); err == nil && under(r, path) {
		return true
	}
	return false
}

// reconcileVMs runs at start-up:
//   - a create or delete the dead daemon left half done is finished (the
//     VM and everything it had are removed);
//   - a running or starting VM whose monitor still runs, and is the process
//     banger started in this boot, is re-adopted (a starting one resumes its
//     boot waiter);
//   - every other VM with runtime state is stopped and its resources
//     released; after a host reboot (another boot id) that is every VM;
//   - monitor processes of a VM that the record does not name (a start
//     that died before recording the pid) are killed.
func reconcileVMs(ctx context.Context, d *Daemon) error {
	start := time.Now()
	vms, err := d.store.ListVMs(nil)
	if err != nil {
		return err
	}
	boot := currentBootID()
	procs := d.monitorProcs()
	// VMs are independent: reconcile several at once, so that one slow
	// monitor socket or disk flush does not hold up the others.
	var mu sync.Mutex
	counts := map[outcome]int{}
	work := make(chan model.VM)
	var wg sync.WaitGroup
	for range min(reconcileWorkers, len(vms)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for vm := range work {
				o := d.reconcileVM(ctx, vm, boot, procs[vm.ID])
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
	d.log.Info("reconciled VMs", "vms", len(vms), "adopted", counts[adopted], "cleaned", counts[cleaned],
		"removed", counts[removedVM], "failed", counts[failed], "duration", time.Since(start).Round(time.Microsecond))
	return nil
}

// reconcileWorkers is how many VMs start-up reconciles at once.
const reconcileWorkers = 8

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
func (d *Daemon) reconcileVM(ctx context.Context, vm model.VM, boot string, procs []vmm.Handle) outcome {
	log := d.log.With("vm", vm.Name, "id", vm.ID)
	if vm.Runtime.Phase == phaseDeleting || (vm.State == model.VMCreated && vm.Runtime.Phase != "") {
		what := "finished the interrupted delete"
		if vm.Runtime.Phase != phaseDeleting {
			what = "removed the VM of an interrupted create"
		}
		rt, source := d.recoveryRuntime(vm)
		vm.Runtime = rt
		removed, err := d.finishRemove(ctx, vm, procs)
		if err != nil {
			log.Error("start-up: cannot remove the VM of an interrupted create or delete", "err", err, "source", source)
			return failed
		}
		log.Info("start-up: "+what, "removed", strings.Join(removed, ", "), "source", source)
		return removedVM
	}
	if vm.Runtime.Empty() && len(procs) == 0 && !hasHandles(d, vm.ID) {
		switch vm.State {
		case model.VMStarting, model.VMStopping, model.VMRunning:
			_, _ = d.setState(vm.ID, model.VMStopped, "", nil)
			log.Info("VM stopped at start-up: it held no runtime state")
			return cleaned
		}
		return untouched
	}
	rt, source := d.recoveryRuntime(vm)
	rt, refused := d.ownRuntime(vm.ID, rt)
	for _, r := range refused {
		log.Warn("start-up: refusing a resource the VM's record names but banger cannot prove it made", "refused", r, "source", source)
	}
	vm.Runtime = rt
	log = log.With("source", source)
	if d.readopt(ctx, vm, boot, log) {
		if removed := d.killStrays(ctx, procs, rt.PID); len(removed) > 0 {
			log.Warn("killed stray VM monitor processes", "removed", strings.Join(removed, ", "))
		}
		return adopted
	}
	why := "its VM monitor is gone"
	switch {
	case rt.BootID != "" && rt.BootID != boot:
		why = "the host rebooted"
	case vm.State == model.VMStopping:
		why = "it was stopping"
	case rt.PID == 0:
		why = "its start had not finished"
	}
	strays := d.killStrays(ctx, procs, 0)
	out, rerr := d.releaseAndMark(ctx, vm, mark{state: model.VMStopped, also: strays, failed: func(err error) string {
		return "cleanup after restart failed: " + err.Error()
	}})
	log.Info("VM stopped at start-up: "+why, "removed", strings.Join(out.Recovery.Removed, ", "), "err", rerr)
	if rerr != nil {
		return failed
	}
	return cleaned
}

// readopt takes a running or starting VM back when its monitor process is
// the one recorded (this boot, same start time and command line) and
// answers on its socket: the VM stays running, a starting one resumes its
// boot waiter. It reports whether the VM was re-adopted.
func (d *Daemon) readopt(ctx context.Context, vm model.VM, boot string, log *slog.Logger) bool {
	rt := vm.Runtime
	if rt.PID == 0 || rt.BootID != boot || (vm.State != model.VMRunning && vm.State != model.VMStarting) {
		return false
	}
	mon, err := d.monitor(vm.VMM)
	if err != nil {
		return false
	}
	h := handleOf(rt)
	if alive, _ := mon.Alive(h); !alive {
		return false
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = mon.Reattach(rctx, h)
	cancel()
	if err == nil {
		vm, err = d.store.UpdateVM(vm.ID, func(v *model.VM) error {
			v.Runtime = rt
			v.Recovery.ReadoptedAt = time.Now().UTC()
			return nil
		})
	}
	if err == nil {
		err = d.writeHandles(vm)
	}
	if err != nil {
		log.Warn("VM monitor runs but cannot be re-adopted; stopping it", "pid", rt.PID, "err", err)
		return false
	}
	d.watch(vm)
	log.Info("re-adopted VM", "pid", rt.PID, "state", vm.State)
	return true
}

// finishRemove removes a VM whose create or delete was interrupted: its
// devices, processes, disk, runtime dir, VM dir, record and lease.
func (d *Daemon) finishRemove(ctx context.Context, vm model.VM, procs []vmm.Handle) ([]string, error) {
	removed, err := d.releaseRuntime(ctx, vm, true)
	removed = append(removed, d.killStrays(ctx, procs, 0)...)
	if err == nil {
		err = d.removeUnder(d.cfg.VMsDir(), d.vmDir(vm.ID))
	}
	if err == nil {
		removed = append(removed, "VM dir "+d.vmDir(vm.ID))
		err = d.store.DeleteVM(vm.ID)
	}
	if err != nil {
		_, _ = d.setState(vm.ID, model.VMError, "removal after restart failed: "+err.Error(), nil)
		return removed, err
	}
	return removed, nil
}

func hasHandles(d *Daemon, id string) bool {
	_, err := os.Stat(d.handlesPath(id))
	return err == nil
}

// monitorProcs finds the VM monitor processes of this daemon's VMs: the
// configured firecracker or QEMU program with an argument naming a path
// inside <runtime_dir>/vms/<id>/. It returns their identities by VM id.
// It finds the monitors of starts that died before recording the pid.
func (d *Daemon) monitorProcs() map[string][]vmm.Handle {
	progs := map[string]bool{}
	for _, m := range []string{firecrackerProgram(d), qemuProgram(d)} {
		progs[filepath.Base(m)] = true
	}
	prefix := filepath.Join(d.cfg.RuntimeDir, "vms") + "/"
	out := map[string][]vmm.Handle{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 1 || pid == self {
			continue
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || len(raw) == 0 {
			continue
		}
		argv := strings.Split(strings.TrimSuffix(string(raw), "\x00"), "\x00")
		if !progs[filepath.Base(argv[0])] {
			continue
		}
		id := ""
		for _, a := range argv[1:] {
			if i := strings.Index(a, prefix); i >= 0 {
				rest := a[i+len(prefix):]
				if j := strings.IndexByte(rest, '/'); j > 0 {
					id = rest[:j]
					break
				}
			}
		}
		if id == "" {
			continue
		}
		h, err := vmm.Identify(pid)
		if err != nil || !slices.Equal(h.Cmdline, argv) {
			continue // gone or changed meanwhile
		}
		out[id] = append(out[id], h)
	}
	return out
}

func firecrackerProgram(d *Daemon) string {
	if d.cfg.FirecrackerBinary != "" {
		return d.cfg.FirecrackerBinary
	}
	return "firecracker"
}

func qemuProgram(d *Daemon) string {
	if d.cfg.QEMUBinary != "" {
		return d.cfg.QEMUBinary
	}
	return "qemu-system-x86_64"
}

// killStrays kills the monitor processes in procs other than keep with
// SIGKILL, each only if it still is the process identified, and returns
// what it removed.
func (d *Daemon) killStrays(ctx context.Context, procs []vmm.Handle, keep int) []string {
	var removed []string
	for _, h := range procs {
		if h.PID == keep {
			continue
		}
		if err := vmm.Signal(h, syscall.SIGKILL); err != nil {
			if !errors.Is(err, vmm.ErrNotRunning) {
				d.log.Warn("cannot kill stray VM monitor", "pid", h.PID, "err", err)
			}
			continue
		}
		vmm.WaitGone(ctx, h, 5*time.Second)
		removed = append(removed, fmt.Sprintf("stray monitor pid %d (%s)", h.PID, filepath.Base(h.Cmdline[0])))
	}
	return removed
}

// scanOrphans removes what carries banger's identity but belongs to no VM
// record, one log line each, and touches nothing else:
//   - taps named bgr-* with a banger: alias;
//   - loop devices backed by files under the state dir;
//   - BANGER-* dm devices;
//   - VM monitor processes naming an unknown VM's runtime dir;
//   - the banger nftables table when no VM runs;
//   - runtime dirs and VM dirs of unknown VMs, and half-copied disks
//     (*.partial) in VM dirs.
//
// Image staging dirs and pull scratch dirs are recoverPullLeftovers' job.
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
	for id, procs := range d.monitorProcs() {
		if _, ok := known[id]; ok {
			continue
		}
		for _, r := range d.killStrays(ctx, procs, 0) {
			d.log.Info("removed orphan VM monitor", "vm_id", id, "process", r)
		}
	}
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
		if !underDir(d.cfg.StateDir, file) || inUse["loop:"+file] {
			continue
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(b)))
		if err := blockdev.DetachLoop(ctx, dev, file, d.cfg.StateDir); err != nil {
			errs = append(errs, fmt.Errorf("orphan loop %s: %w", dev, err))
			continue
		}
		d.log.Info("removed orphan loop device", "loop", dev, "backing_file", file)
	}
	d.releaseNetworkIfIdle(ctx)
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
			p := filepath.Join(d.cfg.VMsDir(), e.Name())
			if _, ok := known[e.Name()]; ok {
				partials, _ := filepath.Glob(filepath.Join(p, "*.partial"))
				for _, f := range partials {
					if err := os.Remove(f); err == nil {
						d.log.Info("removed half-copied disk of an interrupted start", "file", f)
					}
				}
				continue
			}
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
