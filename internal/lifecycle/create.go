package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/failpoint"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/snapshot"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/subpath"
	"github.com/bangerdev/banger/internal/units"
	"github.com/bangerdev/banger/internal/vmm"
)

// Phases of VM.Runtime that are not about a running VM: they mark a create
// or a delete in progress, so that start-up finishes what a dead daemon
// began.
const (
	PhaseCreating = "creating" // Create: record stored, disk not made yet
	PhaseDeleting = "deleting" // Delete: removal under way
)

// Defaults of a new VM.
const (
	defaultCPUs      = 2
	defaultMemoryMiB = 1024
)

// CreateOption changes how Create makes a VM.
type CreateOption func(*createOptions)

type createOptions struct {
	diskFrom string // a disk file to copy instead of the image's root filesystem
}

// WithDiskFrom makes the new VM's disk a copy of the disk file path (a
// reflink where the filesystem shares extents, else a sparse copy), instead
// of a copy of its image's root filesystem: a clone's disk comes straight
// from its snapshot's, with no image disk built only to be replaced. The
// VM's disk driver is then the copy's (reflink or copy), its size the
// file's.
func WithDiskFrom(path string) CreateOption {
	return func(o *createOptions) { o.diskFrom = path }
}

// Create records a new VM owned by uid with its IP lease and prepares its
// disk. A failure removes everything it made.
func (s *Service) Create(ctx context.Context, req api.CreateVMRequest, uid uint32, report progress.Func, opts ...CreateOption) (vm model.VM, retErr error) {
	var o createOptions
	for _, opt := range opts {
		opt(&o)
	}
	spec, err := s.createSpec(ctx, req, report)
	if err != nil {
		return vm, err
	}
	if o.diskFrom != "" {
		fi, err := os.Stat(o.diskFrom)
		if err != nil {
			return vm, fmt.Errorf("disk to copy: %w", err)
		}
		spec.disk = max(spec.disk, fi.Size())
	}
	ports, err := portSpecs(req.Ports, uid)
	if err != nil {
		return vm, err
	}
	folders, err := mountSpecs(ctx, req.Mounts, uid)
	if err != nil {
		return vm, err
	}
	nc, err := s.NetConfig()
	if err != nil {
		return vm, err
	}
	id := model.NewID()
	vm = model.VM{
		ID: id, Name: spec.name, OwnerUID: uid, Image: spec.img.Name, ImageID: spec.img.ID, Kernel: spec.kernel,
		CPUs: spec.cpus, MemoryMiB: int(spec.mem >> 20), DiskBytes: max(spec.disk, spec.img.Size), VMM: spec.vmm, DiskDriver: spec.driver,
		MAC: netctl.MACFor(id).String(), State: model.VMCreated, Created: time.Now().UTC(), SSHKey: req.SSHKey,
		Init: spec.init, Cmd: spec.cmd, Env: spec.env, Ports: ports, Mounts: folders,
		// Until the disk is made, the record says so: a daemon that dies
		// meanwhile removes the half-made VM at its next start-up.
		Runtime: model.Runtime{Phase: PhaseCreating},
	}
	// Hold the VM's lock from the moment its record exists until the disk
	// is made and the record final: a start of the same VM (by name, as
	// soon as it is listed) waits, instead of recording a monitor that
	// create's last write would then wipe from the record.
	mu := s.Lock(id)
	mu.Lock()
	defer mu.Unlock()
	if err := s.withinQuota(vm, func() error { return s.store.CreateVM(&vm, nc.Subnet) }); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return vm, api.Errorf(api.CodeConflict, "a VM named %q already exists", spec.name)
		}
		if errors.Is(err, store.ErrFull) {
			return vm, api.Errorf(api.CodeConflict, "no free guest address in %s: remove a VM or configure a larger subnet", nc.Subnet)
		}
		return vm, err
	}
	failpoint.Reach("create:recorded")
	log := s.log.With("vm", spec.name, "id", id)
	note := initNote(spec.img, spec.init)
	log.Info("VM created", "image", spec.img.Name, "vmm", spec.vmm, "vmm_reason", spec.vmmWhy, "disk_driver", spec.driver, "ip", vm.IP, "init", note)
	report.Report(progress.Event{Phase: "init", Item: spec.name, Message: note})
	defer func() {
		if retErr != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
			defer cancel()
			cur, _ := s.store.GetVM(id)
			s.cancelDiskFlush(id)
			if _, err := s.Release(cctx, cur, true); err != nil {
				log.Error("clean up failed create", "err", err)
			}
			_ = subpath.RemoveAll(s.cfg.VMsDir(), s.VMDir(id))
			_ = s.store.DeleteVM(id)
		}
	}()
	if o.diskFrom != "" {
		return s.copyDisk(ctx, vm, o.diskFrom, report)
	}
	return s.makeDisk(ctx, vm, spec.img, report)
}

// vmSpec is a create request checked and resolved.
type vmSpec struct {
	img          model.Image
	name, kernel string
	cpus         int
	mem, disk    int64
	vmm, vmmWhy  string
	driver       string
	init         guestabi.Init
	cmd, env     []string
}

// createSpec checks a create request and resolves its image, kernel,
// monitor and disk driver.
func (s *Service) createSpec(ctx context.Context, req api.CreateVMRequest, report progress.Func) (vmSpec, error) {
	var sp vmSpec
	img, err := s.store.GetImage(req.Image)
	if err != nil {
		return sp, api.Errorf(api.CodeNotFound, "image %q not found: pull it first with banger image pull", req.Image)
	}
	sp.img, sp.name = img, req.Name
	if sp.name == "" {
		sp.name = img.Name + "-" + model.NewID()[:6]
	}
	if err := model.ValidateName("vm", sp.name); err != nil {
		return sp, api.Errorf(api.CodeInvalid, "%v", err)
	}
	if sp.cpus = req.CPUs; sp.cpus == 0 {
		sp.cpus = defaultCPUs
	}
	if sp.cpus < 1 || sp.cpus > 64 {
		return sp, api.Errorf(api.CodeInvalid, "--cpus %d: use 1 to 64", sp.cpus)
	}
	sp.mem = int64(defaultMemoryMiB) << 20
	if req.Memory != "" {
		if sp.mem, err = units.ParseSize(req.Memory); err != nil {
			return sp, api.Errorf(api.CodeInvalid, "--memory: %v", err)
		}
		if sp.mem < 128<<20 || sp.mem > 256<<30 {
			return sp, api.Errorf(api.CodeInvalid, "--memory %s: use 128M to 256G", req.Memory)
		}
	}
	if req.Disk != "" {
		if sp.disk, err = units.ParseSize(req.Disk); err != nil {
			return sp, api.Errorf(api.CodeInvalid, "--disk: %v", err)
		}
		if sp.disk < img.Size {
			return sp, api.Errorf(api.CodeInvalid, "--disk %s is smaller than image %q (%s)", req.Disk, img.Name, units.HumanBytes(img.Size))
		}
	}
	sp.kernel = img.Kernel
	if req.KernelRef != "" && req.KernelRef != img.Kernel {
		k, err := s.kernels.ResolveKernel(ctx, req.KernelRef, report)
		if err != nil {
			return sp, err
		}
		sp.kernel = k.Name
	}
	if sp.kernel == "" {
		return sp, api.Errorf(api.CodeInvalid, "image %q has no kernel: pass --kernel-ref (banger kernel ls lists the kernels)", img.Name)
	}
	pref := req.VMM
	if pref == "" {
		pref = s.cfg.VMM
	}
	sp.vmm, sp.vmmWhy, err = vmm.Select(pref)
	if err != nil && pref == "firecracker" && s.cfg.FirecrackerWithoutKVM {
		sp.vmm, sp.vmmWhy, err = "firecracker", "requested (firecracker_without_kvm is set)", nil
	}
	if err != nil {
		return sp, api.Errorf(api.CodeInvalid, "%v", err)
	}
	sp.driver = s.cfg.DiskDriver
	if sp.driver == "" || sp.driver == blockdev.DriverAuto {
		var reason string
		sp.driver, reason = s.Disks().DetectDriver(ctx)
		s.log.Info("disk driver chosen", "driver", sp.driver, "reason", reason)
	}
	if req.SSHKey != "" {
		if _, _, err := agent.ParseAuthorizedKeyLine(req.SSHKey); err != nil {
			return sp, api.Errorf(api.CodeInvalid, "ssh key: %v", err)
		}
	}
	if sp.init, sp.cmd, sp.env, err = guestOptions(req); err != nil {
		return sp, err
	}
	return sp, nil
}

// makeDisk makes the new VM's disk now, so that start is fast; its devices
// are deactivated until the VM starts. A copy or reflink is not flushed
// here: the record is made final first, then the copy (still
// disk.ext4.unsynced) is flushed in the background and renamed into
// place, and the VM's start waits for that. A daemon or host that dies
// before the rename leaves only the .unsynced file, which nothing uses:
// start-up recovery removes it and the start copies the image again.
func (s *Service) makeDisk(ctx context.Context, vm model.VM, img model.Image, report progress.Func) (model.VM, error) {
	report.Report(progress.Event{Phase: "disk", Item: vm.Name, Message: vm.DiskDriver})
	if err := os.MkdirAll(s.VMDir(vm.ID), 0o700); err != nil {
		return vm, err
	}
	disks := s.Disks()
	dk, err := disks.Prepare(ctx, blockdev.PrepareOptions{
		VMID: vm.ID, BaseImage: img.RootFS, VMDir: s.VMDir(vm.ID), SizeBytes: vm.DiskBytes, Driver: vm.DiskDriver,
		Intent: func(dk blockdev.Disk) error {
			_, err := s.store.UpdateVM(vm.ID, func(v *model.VM) error { v.Runtime.Phase, v.Runtime.Disk = "disk:creating", dk; return nil })
			return err
		},
		DeferSync: true,
	})
	if err != nil {
		return vm, fmt.Errorf("prepare disk of VM %q: %w", vm.Name, err)
	}
	failpoint.Reach("create:disk")
	if err := disks.Deactivate(ctx, dk); err != nil {
		return vm, fmt.Errorf("deactivate disk of VM %q: %w", vm.Name, err)
	}
	vm, err = s.store.UpdateVM(vm.ID, func(v *model.VM) error {
		v.DiskDriver = dk.Driver
		v.Runtime = model.Runtime{}
		return nil
	})
	if err != nil {
		return vm, err
	}
	failpoint.Reach("create:unsynced")
	msg := ""
	if disks.FlushInBackground(dk) {
		msg = "flushing in the background"
	}
	report.Report(progress.Event{Phase: "disk", Item: vm.Name, Done: true, Message: msg})
	return vm, nil
}

// copyDisk makes the new VM's disk a copy of the disk file src (see
// WithDiskFrom), recorded first: the copy is written beside it and renamed
// into place when whole, unflushed, under a marker (copyDiskUnflushed).
func (s *Service) copyDisk(ctx context.Context, vm model.VM, src string, report progress.Func) (model.VM, error) {
	report.Report(progress.Event{Phase: "disk", Item: vm.Name, Message: "copying " + filepath.Base(filepath.Dir(src)) + "'s disk"})
	dir := s.VMDir(vm.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return vm, err
	}
	dst := filepath.Join(dir, blockdev.DiskFileName)
	dk := blockdev.Disk{Driver: blockdev.DriverCopy, Path: dst, COWPath: dst}
	if _, err := s.store.UpdateVM(vm.ID, func(v *model.VM) error { v.Runtime.Phase, v.Runtime.Disk = "disk:creating", dk; return nil }); err != nil {
		return vm, err
	}
	began := time.Now()
	how, err := s.copyDiskUnflushed(ctx, src, dst)
	if err != nil {
		return vm, fmt.Errorf("copy the disk of VM %q: %w", vm.Name, err)
	}
	s.log.Debug("disk copied", "vm", vm.Name, "from", src, "how", how, "took", time.Since(began).Round(time.Millisecond))
	failpoint.Reach("clone:disk")
	driver := blockdev.DriverCopy
	if how == snapshot.CopiedByReflink {
		driver = blockdev.DriverReflink
	}
	vm, err = s.store.UpdateVM(vm.ID, func(v *model.VM) error {
		v.DiskDriver = driver
		v.Runtime = model.Runtime{}
		return nil
	})
	report.Report(progress.Event{Phase: "disk", Item: vm.Name, Done: true, Message: how})
	return vm, err
}

// diskFlushDelay is how long the flush of a disk copied for a restore or
// a clone waits before it starts, so that the start's records (fsynced
// commits) do not wait behind the copy's writeback (blockdev.FlushAfter).
const diskFlushDelay = 2 * time.Second

// copyDiskUnflushed makes dst a copy of the disk file src without waiting
// for the copy's flush, which runs in the background: the copy is written
// beside dst (dst.partial, removed on failure or by start-up recovery), the
// marker (blockdev.MarkUnflushed, with this boot's id) is made durable, and
// only then is the copy renamed over dst. Should the daemon die before the
// flush, start-up reconcile flushes the disk if the host did not go down
// with it, and removes it if it did (blockdev.ReconcileUnflushed). It says
// how the copy was made.
func (s *Service) copyDiskUnflushed(ctx context.Context, src, dst string) (how string, err error) {
	// A flush of an earlier copy at dst would remove the new one's marker.
	if err := s.syncs.Flushing(ctx, dst); err != nil {
		return "", err
	}
	boot, err := vmm.BootID()
	if err != nil {
		return "", err
	}
	tmp := dst + ".partial"
	_ = os.Remove(tmp)
	defer func() {
		if err != nil {
			_ = os.Remove(tmp)
		}
	}()
	if how, err = snapshot.CopyDiskUnflushed(ctx, src, tmp); err != nil {
		return "", err
	}
	if err := blockdev.MarkUnflushed(dst, boot); err != nil {
		return "", err
	}
	// A restore replaces the VM's old disk: see RenameOver for why it is
	// not a plain rename. The old one is freed here, before the VM monitor
	// starts, not in the background: on this host memory that was just
	// freed is what a new process touches fastest (its host hands free
	// memory back to its own hypervisor), and the restore's state load
	// took 110-175 ms after it against 110-240 ms with the free running
	// alongside.
	drop, err := blockdev.RenameOver(tmp, dst)
	if err != nil {
		// dst is as it was: whole and flushed, or absent.
		_ = os.Remove(dst + blockdev.UnflushedSuffix)
		return "", err
	}
	drop()
	s.syncs.FlushAfter(dst, diskFlushDelay)
	return how, nil
}

// Delete removes a VM: its devices, disk, runtime dir, console log, record
// and IP lease. A running VM needs force, which stops it first.
func (s *Service) Delete(ctx context.Context, id string, force bool) (api.DeleteResult, error) {
	vm, err := s.store.GetVM(id)
	if err != nil {
		return api.DeleteResult{}, err
	}
	switch vm.State {
	case model.VMRunning, model.VMStarting, model.VMStopping:
		if !force {
			return api.DeleteResult{}, api.Errorf(api.CodeConflict, "VM %q is %s: stop it first or pass --force", vm.Name, vm.State)
		}
		if _, err := s.Stop(ctx, id, nil); err != nil {
			return api.DeleteResult{}, err
		}
	}
	mu := s.Lock(id)
	mu.Lock()
	defer mu.Unlock()
	vm, err = s.store.GetVM(id)
	if err != nil {
		return api.DeleteResult{}, err
	}
	if sup := s.sups.Take(id); sup != nil {
		sup.Close()
	}
	s.cancelDiskFlush(id)
	freed := subpath.DiskUsage(s.VMDir(id))
	// Record the intent first: a daemon that dies from here on finishes
	// the delete at its next start-up (package reconciler).
	if vm, err = s.setRuntime(id, func(rt *model.Runtime) { rt.Phase = PhaseDeleting }); err != nil {
		return api.DeleteResult{}, err
	}
	failpoint.Reach("delete:intent")
	if _, err := s.Release(ctx, vm, true); err != nil {
		_, _ = s.SetState(id, model.VMError, "delete: "+err.Error(), nil)
		return api.DeleteResult{}, fmt.Errorf("delete VM %q: %w", vm.Name, err)
	}
	failpoint.Reach("delete:released")
	if err := subpath.RemoveAll(s.cfg.VMsDir(), s.VMDir(id)); err != nil {
		return api.DeleteResult{}, fmt.Errorf("delete VM %q: %w", vm.Name, err)
	}
	failpoint.Reach("delete:dir")
	if err := s.store.DeleteVM(id); err != nil {
		return api.DeleteResult{}, err
	}
	s.log.Info("VM deleted", "vm", vm.Name, "id", id, "freed", freed)
	return api.DeleteResult{Deleted: vm.Name, Freed: freed}, nil
}
