package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/units"
	"github.com/bangerdev/banger/internal/vmm"
)

// Defaults of a new VM.
const (
	defaultCPUs      = 2
	defaultMemoryMiB = 1024
)

func (d *Daemon) handleVMCreate(w http.ResponseWriter, r *http.Request) {
	var req api.CreateVMRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	caller := CallerFrom(r.Context())
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		vm, err := d.createVM(ctx, req, caller, report)
		if err != nil || !req.Start {
			return vm, err
		}
		return d.startVM(ctx, vm.ID, "", req.Wait, report)
	})
}

// createVM records a new VM with its IP lease and prepares its disk.
func (d *Daemon) createVM(ctx context.Context, req api.CreateVMRequest, caller Caller, report progress.Func) (vm model.VM, retErr error) {
	img, err := d.store.GetImage(req.Image)
	if err != nil {
		return vm, api.Errorf(api.CodeNotFound, "image %q not found: pull it first with banger image pull", req.Image)
	}
	name := req.Name
	if name == "" {
		name = img.Name + "-" + newID()[:6]
	}
	if err := model.ValidateName("vm", name); err != nil {
		return vm, api.Errorf(api.CodeInvalid, "%v", err)
	}
	cpus := req.CPUs
	if cpus == 0 {
		cpus = defaultCPUs
	}
	if cpus < 1 || cpus > 64 {
		return vm, api.Errorf(api.CodeInvalid, "--cpus %d: use 1 to 64", cpus)
	}
	mem := int64(defaultMemoryMiB) << 20
	if req.Memory != "" {
		if mem, err = units.ParseSize(req.Memory); err != nil {
			return vm, api.Errorf(api.CodeInvalid, "--memory: %v", err)
		}
		if mem < 128<<20 || mem > 256<<30 {
			return vm, api.Errorf(api.CodeInvalid, "--memory %s: use 128M to 256G", req.Memory)
		}
	}
	var disk int64
	if req.Disk != "" {
		if disk, err = units.ParseSize(req.Disk); err != nil {
			return vm, api.Errorf(api.CodeInvalid, "--disk: %v", err)
		}
		if disk < img.Size {
			return vm, api.Errorf(api.CodeInvalid, "--disk %s is smaller than image %q (%s)", req.Disk, img.Name, units.HumanBytes(img.Size))
		}
	}
	kernelName := img.Kernel
	if req.KernelRef != "" && req.KernelRef != img.Kernel {
		k, err := d.resolveKernel(ctx, req.KernelRef, report)
		if err != nil {
			return vm, err
		}
		kernelName = k.Name
	}
	if kernelName == "" {
		return vm, api.Errorf(api.CodeInvalid, "image %q has no kernel: pass --kernel-ref (banger kernel ls lists the kernels)", img.Name)
	}
	pref := req.VMM
	if pref == "" {
		pref = d.cfg.VMM
	}
	vmmName, why, err := vmm.Select(pref)
	if err != nil && pref == "firecracker" && d.cfg.FirecrackerWithoutKVM {
		vmmName, why, err = "firecracker", "requested (firecracker_without_kvm is set)", nil
	}
	if err != nil {
		return vm, api.Errorf(api.CodeInvalid, "%v", err)
	}
	driver := d.cfg.DiskDriver
	if driver == "" || driver == blockdev.DriverAuto {
		var reason string
		driver, reason = d.disks().DetectDriver(ctx)
		d.log.Info("disk driver chosen", "driver", driver, "reason", reason)
	}
	if req.SSHKey != "" {
		if _, _, err := agent.ParseAuthorizedKeyLine(req.SSHKey); err != nil {
			return vm, api.Errorf(api.CodeInvalid, "ssh key: %v", err)
		}
	}
	initChoice, cmd, env, err := guestOptions(req)
	if err != nil {
		return vm, err
	}
	nc, err := d.netConfig()
	if err != nil {
		return vm, err
	}
	id := newID()
	vm = model.VM{
		ID: id, Name: name, OwnerUID: caller.UID, Image: img.Name, ImageID: img.ID, Kernel: kernelName,
		CPUs: cpus, MemoryMiB: int(mem >> 20), DiskBytes: max(disk, img.Size), VMM: vmmName, DiskDriver: driver,
		MAC: netctl.MACFor(id).String(), State: model.VMCreated, Created: time.Now().UTC(), SSHKey: req.SSHKey,
		Init: initChoice, Cmd: cmd, Env: env,
		// Until the disk is made, the record says so: a daemon that dies
		// meanwhile removes the half-made VM at its next start-up.
		Runtime: model.Runtime{Phase: phaseCreating},
	}
	if err := d.store.CreateVM(&vm, nc.Subnet); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return vm, api.Errorf(api.CodeConflict, "a VM named %q already exists", name)
		}
		if errors.Is(err, store.ErrFull) {
			return vm, api.Errorf(api.CodeConflict, "no free guest address in %s: remove a VM or configure a larger subnet", nc.Subnet)
		}
		return vm, err
	}
	failpoint("create:recorded")
	log := d.log.With("vm", name, "id", id)
	log.Info("VM created", "image", img.Name, "vmm", vmmName, "vmm_reason", why, "disk_driver", driver, "ip", vm.IP, "init", initNote(img, initChoice))
	report.Report(progress.Event{Phase: "init", Item: name, Message: initNote(img, initChoice)})
	defer func() {
		if retErr != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			cur, _ := d.store.GetVM(id)
			if _, err := d.releaseRuntime(cctx, cur, true); err != nil {
				log.Error("clean up failed create", "err", err)
			}
			_ = d.removeUnder(d.cfg.VMsDir(), d.vmDir(id))
			_ = d.store.DeleteVM(id)
		}
	}()

	// Make the disk now, so start is fast; its devices are deactivated
	// until the VM starts.
	report.Report(progress.Event{Phase: "disk", Item: name, Message: driver})
	if err := os.MkdirAll(d.vmDir(id), 0o700); err != nil {
		return vm, err
	}
	dk, err := d.disks().Prepare(ctx, blockdev.PrepareOptions{
		VMID: id, BaseImage: img.RootFS, VMDir: d.vmDir(id), SizeBytes: vm.DiskBytes, Driver: driver,
		Intent: func(dk blockdev.Disk) error {
			_, err := d.store.UpdateVM(id, func(v *model.VM) error { setDisk(&v.Runtime, dk, "disk:creating"); return nil })
			return err
		},
	})
	if err != nil {
		return vm, fmt.Errorf("prepare disk of VM %q: %w", name, err)
	}
	failpoint("create:disk")
	if err := d.disks().Deactivate(ctx, dk); err != nil {
		return vm, fmt.Errorf("deactivate disk of VM %q: %w", name, err)
	}
	vm, err = d.store.UpdateVM(id, func(v *model.VM) error {
		v.DiskDriver = dk.Driver
		v.Runtime = model.Runtime{}
		return nil
	})
	report.Report(progress.Event{Phase: "disk", Item: name, Done: true})
	return vm, err
}

// startRequest reads the body of a start or restart and the VM it names,
// answering the error itself when there is one.
func (d *Daemon) startRequest(w http.ResponseWriter, r *http.Request) (api.StartVMRequest, model.VM, bool) {
	var req api.StartVMRequest
	if r.ContentLength != 0 {
		if err := decodeBody(r, &req); err != nil {
			d.writeError(w, r, err)
			return req, model.VM{}, false
		}
	}
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return req, vm, false
	}
	if req.SSHKey != "" {
		if _, _, err := agent.ParseAuthorizedKeyLine(req.SSHKey); err != nil {
			d.writeError(w, r, api.Errorf(api.CodeInvalid, "ssh key: %v", err))
			return req, vm, false
		}
	}
	return req, vm, true
}

func (d *Daemon) handleVMStart(w http.ResponseWriter, r *http.Request) {
	req, vm, ok := d.startRequest(w, r)
	if !ok {
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return d.startVM(ctx, vm.ID, req.SSHKey, req.Wait, report)
	})
}

func (d *Daemon) handleVMStop(w http.ResponseWriter, r *http.Request) {
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return d.stopVM(context.WithoutCancel(ctx), vm.ID, report)
	})
}

func (d *Daemon) handleVMRestart(w http.ResponseWriter, r *http.Request) {
	req, vm, ok := d.startRequest(w, r)
	if !ok {
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		if _, err := d.stopVM(context.WithoutCancel(ctx), vm.ID, report); err != nil {
			return nil, err
		}
		return d.startVM(ctx, vm.ID, req.SSHKey, req.Wait, report)
	})
}

func (d *Daemon) handleVMDelete(w http.ResponseWriter, r *http.Request) {
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	force := r.URL.Query().Get("force") == "true"
	res, err := d.deleteVM(context.WithoutCancel(r.Context()), vm.ID, force)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// deleteVM removes a VM: its devices, disk, runtime dir, console log,
// record and IP lease. A running VM needs force, which stops it first.
func (d *Daemon) deleteVM(ctx context.Context, id string, force bool) (api.DeleteResult, error) {
	vm, err := d.store.GetVM(id)
	if err != nil {
		return api.DeleteResult{}, err
	}
	switch vm.State {
	case model.VMRunning, model.VMStarting, model.VMStopping:
		if !force {
			return api.DeleteResult{}, api.Errorf(api.CodeConflict, "VM %q is %s: stop it first or pass --force", vm.Name, vm.State)
		}
		if _, err := d.stopVM(ctx, id, nil); err != nil {
			return api.DeleteResult{}, err
		}
	}
	mu := d.vmLock(id)
	mu.Lock()
	defer mu.Unlock()
	vm, err = d.store.GetVM(id)
	if err != nil {
		return api.DeleteResult{}, err
	}
	if l := d.lives.take(id); l != nil {
		l.stopping = true
		l.cancel()
	}
	freed := dirSize(d.vmDir(id))
	// Record the intent first: a daemon that dies from here on finishes
	// the delete at its next start-up (reconcile.go).
	if vm, err = d.setRuntime(id, func(rt *model.Runtime) { rt.Phase = phaseDeleting }); err != nil {
		return api.DeleteResult{}, err
	}
	failpoint("delete:intent")
	if _, err := d.releaseRuntime(ctx, vm, true); err != nil {
		_, _ = d.setState(id, model.VMError, "delete: "+err.Error(), nil)
		return api.DeleteResult{}, fmt.Errorf("delete VM %q: %w", vm.Name, err)
	}
	failpoint("delete:released")
	if err := d.removeUnder(d.cfg.VMsDir(), d.vmDir(id)); err != nil {
		return api.DeleteResult{}, fmt.Errorf("delete VM %q: %w", vm.Name, err)
	}
	failpoint("delete:dir")
	if err := d.store.DeleteVM(id); err != nil {
		return api.DeleteResult{}, err
	}
	d.log.Info("VM deleted", "vm", vm.Name, "id", id, "freed", freed)
	return api.DeleteResult{Deleted: vm.Name, Freed: freed}, nil
}

// handleVMLogs streams the VM's serial console log; with follow=true it
// keeps streaming new output until the client goes away.
func (d *Daemon) handleVMLogs(w http.ResponseWriter, r *http.Request) {
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	f, err := os.Open(d.consoleLog(vm.ID))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			d.writeError(w, r, api.Errorf(api.CodeNotFound, "VM %q has no console log yet: it has never been started", vm.Name))
			return
		}
		d.writeError(w, r, err)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	follow := r.URL.Query().Get("follow") == "true"
	buf := make([]byte, 32<<10)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			continue
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return
		}
		if !follow {
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}
