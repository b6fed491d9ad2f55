package lifecycle

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/failpoint"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/supervisor"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
)

// Start starts a created or stopped VM. It reads as its steps: beginStart
// (mark it starting) → prepareDisk → attachNetwork → launchMonitor →
// supervise. Each step records a resource in VM.Runtime before it creates
// it; when a step fails, failStart releases everything made so far and the
// VM goes to error. The boot waiter then runs in the background; when wait
// is true Start waits for it.
func (s *Service) Start(ctx context.Context, idOrName string, sshKey string, wait bool, report progress.Func) (model.VM, error) {
	vm, err := s.store.GetVM(idOrName)
	if err != nil {
		return vm, err
	}
	mu := s.Lock(vm.ID)
	mu.Lock()
	run, err := s.beginStart(ctx, vm.ID, sshKey)
	if err != nil {
		mu.Unlock()
		return run.vm, err
	}
	sup, err := s.runStart(ctx, run, report, s.prepareDisk, s.attachNetwork, s.launchMonitor)
	mu.Unlock()
	if err != nil || !wait {
		return run.vm, err
	}
	return s.waitReady(ctx, run.vm, sup, report)
}

// startStep is one step of a start; it updates run.vm as it records.
type startStep func(context.Context, *startRun, progress.Func) error

// runStart runs the steps of a start in order, then supervises the VM. The
// first step that fails ends the start: failStart releases what the steps
// made and the VM goes to error, so no monitor is ever left running
// without a supervisor.
func (s *Service) runStart(ctx context.Context, run *startRun, report progress.Func, steps ...startStep) (*supervisor.Supervisor, error) {
	for _, step := range steps {
		began := time.Now()
		err := step(ctx, run, report)
		run.took = append(run.took, time.Since(began).Round(time.Millisecond))
		if err != nil {
			run.vm, err = s.failStart(ctx, run, err)
			return nil, err
		}
	}
	return s.Supervise(run.vm), nil
}

// startRun is what the steps of one start share.
type startRun struct {
	vm             model.VM
	mon            vmm.Monitor
	kernel, initrd string
	nc             netctl.Config
	disk           blockdev.Disk
	log            *slog.Logger
	began          time.Time
	// noEgress: the host has no way out (no uplink route, or no NAT), so
	// the guest is told it reaches nothing beyond the host.
	noEgress bool
	// took is how long each step that ran took, in order (for the log).
	took []time.Duration
}

// record takes the VM a store update returned as the run's current record,
// unless the update failed.
func (r *startRun) record(vm model.VM, err error) error {
	if err == nil {
		r.vm = vm
	}
	return err
}

// beginStart checks that the VM can start, releases leftovers of an
// earlier run, and marks it starting with its runtime dir and
// handles.json. The caller holds the VM's lock.
func (s *Service) beginStart(ctx context.Context, id, sshKey string) (*startRun, error) {
	vm, err := s.store.GetVM(id)
	run := &startRun{vm: vm, began: time.Now()}
	if err != nil {
		return run, err
	}
	switch vm.State {
	case model.VMCreated, model.VMStopped, model.VMError:
	case model.VMRunning, model.VMStarting:
		return run, api.Errorf(api.CodeConflict, "VM %q is already %s", vm.Name, vm.State)
	default:
		return run, api.Errorf(api.CodeConflict, "VM %q is %s: try again when it has stopped", vm.Name, vm.State)
	}
	if !vm.Runtime.Empty() {
		// Leftovers of a crash that reconcile could not clear: clean first.
		if _, err := s.Release(ctx, vm, false); err != nil {
			return run, fmt.Errorf("VM %q holds resources from an earlier run that cannot be released: %w", vm.Name, err)
		}
	}
	if run.kernel, run.initrd, err = s.bootArtifacts(vm); err != nil {
		return run, err
	}
	if run.mon, err = s.Monitor(vm.VMM); err != nil {
		return run, err
	}
	if run.nc, err = s.NetConfig(); err != nil {
		return run, err
	}
	if vm.VMM == firecracker.Name {
		// The jailed Firecracker opens its tap as the jail user.
		cred, err := s.jailCredential(vsockCID(vm.IP))
		if err != nil {
			return run, api.Errorf(api.CodeInvalid, "%v", err)
		}
		if cred != nil {
			run.nc.TapUID, run.nc.TapGID = cred.UID, cred.GID
		}
	}
	run.log = s.log.With("vm", vm.Name, "id", vm.ID)
	rtDir := s.RuntimeDir(vm.ID)
	err = run.record(s.store.UpdateVM(vm.ID, func(v *model.VM) error {
		v.State, v.Reason, v.FirstBoot, v.FirstBootLog = model.VMStarting, "", "", nil
		if sshKey != "" {
			v.SSHKey = sshKey
		}
		v.Runtime = model.Runtime{Phase: "runtime-dir", RuntimeDir: rtDir, ConsoleLog: s.ConsoleLog(v.ID)}
		return nil
	}))
	if err != nil {
		return run, err
	}
	failpoint.Reach("start:starting")
	for _, dir := range []string{rtDir, s.VMDir(vm.ID)} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return s.failedBegin(ctx, run, err)
		}
	}
	if err := s.WriteHandles(run.vm); err != nil {
		return s.failedBegin(ctx, run, err)
	}
	return run, nil
}

// failedBegin undoes a beginStart that marked the VM starting.
func (s *Service) failedBegin(ctx context.Context, run *startRun, cause error) (*startRun, error) {
	var err error
	run.vm, err = s.failStart(ctx, run, cause)
	return run, err
}

// failStart releases what a start made and moves the VM to error with the
// cause.
func (s *Service) failStart(ctx context.Context, run *startRun, cause error) (model.VM, error) {
	vm := run.vm
	s.log.Warn("start failed; releasing what it made", "vm", vm.Name, "id", vm.ID, "err", cause)
	cur, err := s.store.GetVM(vm.ID)
	if err != nil {
		cur = vm
	}
	reason := "start failed: " + cause.Error()
	out, _ := s.ReleaseAndMark(ctx, cur, nil, Mark{State: model.VMError, Reason: reason, Failed: func(err error) string {
		return reason + "; cleanup: " + err.Error()
	}})
	if out.ID == "" {
		out = cur
	}
	if ctx.Err() != nil {
		return out, api.Errorf(api.CodeCanceled, "start of VM %q canceled; everything it made was released", vm.Name)
	}
	return out, fmt.Errorf("start VM %q: %w", vm.Name, cause)
}

// prepareDisk activates the VM's disk (made at create; dm-snapshot devices
// come up again), recording it before and after.
func (s *Service) prepareDisk(ctx context.Context, run *startRun, report progress.Func) error {
	vm := run.vm
	report.Report(progress.Event{Phase: "disk", Item: vm.DiskDriver})
	img, err := s.store.GetImage(vm.ImageID)
	if err != nil {
		return err
	}
	disk, err := s.Disks().Prepare(ctx, blockdev.PrepareOptions{
		VMID: vm.ID, BaseImage: img.RootFS, VMDir: s.VMDir(vm.ID), SizeBytes: vm.DiskBytes, Driver: vm.DiskDriver,
		Intent: func(dk blockdev.Disk) error {
			_, err := s.setRuntime(vm.ID, func(rt *model.Runtime) { rt.Phase, rt.Disk = "disk:creating", dk })
			return err
		},
		Waiting: func(d time.Duration) {
			report.Report(progress.Event{Phase: "disk", Item: vm.DiskDriver, Message: fmt.Sprintf("waiting for the new disk to be flushed (%s)", d.Round(time.Second))})
		},
	})
	if err != nil {
		return fmt.Errorf("prepare disk: %w", err)
	}
	if err := run.record(s.setRuntime(vm.ID, func(rt *model.Runtime) { rt.Phase, rt.Disk = "disk:ready", disk })); err != nil {
		return err
	}
	run.disk = disk
	failpoint.Reach("start:disk")
	return nil
}

// attachNetwork makes sure the bridge and NAT exist, then creates the VM's
// tap (recorded first).
func (s *Service) attachNetwork(ctx context.Context, run *startRun, report progress.Func) error {
	vm := run.vm
	report.Report(progress.Event{Phase: "network", Item: vm.Name})
	egress, err := s.ensureNetwork(ctx, run.nc)
	if err != nil {
		return err
	}
	run.noEgress = !egress
	tap := netctl.TapRefFor(vm.ID)
	if err := run.record(s.setRuntime(vm.ID, func(rt *model.Runtime) { rt.Phase, rt.Tap = "tap:creating", tap })); err != nil {
		return err
	}
	failpoint.Reach("start:tap-intent")
	if _, err := netctl.CreateTap(ctx, run.nc, vm.ID); err != nil {
		return fmt.Errorf("create tap %s: %w", tap.Name, err)
	}
	// No record of its own for the tap made or the monitor to come: the
	// tap is recorded above, and the monitor is found by the runtime dir
	// its command line names (recorded at the start), so a commit here
	// would only slow the start.
	failpoint.Reach("start:tap")
	return nil
}

// launchMonitor starts the VM monitor and confirms it in the record. A
// monitor whose handle cannot be recorded is stopped before the error is
// returned: nothing would watch it.
func (s *Service) launchMonitor(ctx context.Context, run *startRun, report progress.Func) error {
	vm := run.vm
	report.Report(progress.Event{Phase: "vmm", Item: vm.VMM})
	spec, err := s.monitorSpec(run)
	if err != nil {
		return err
	}
	began := time.Now()
	h, err := run.mon.Start(ctx, spec)
	if err != nil {
		return fmt.Errorf("start %s: %w", vm.VMM, err)
	}
	failpoint.Reach("start:vmm")
	// Confirm the monitor in one update: its handle, the start time and
	// the command line. Until it is stored nothing watches the monitor, so
	// a failure here stops it before the rest is released.
	if err := run.record(s.confirmMonitor(vm.ID, h, spec, nil)); err != nil {
		_, _ = run.mon.Stop(context.WithoutCancel(ctx), h, 0)
		return fmt.Errorf("record the VM monitor: %w", err)
	}
	failpoint.Reach("start:recorded")
	run.log.Info("VM monitor started", "vmm", vm.VMM, "pid", h.PID, "disk", run.disk.Driver, "tap", vm.Runtime.Tap.Name, "ip", vm.IP,
		"start_overhead", time.Since(run.began).Round(time.Millisecond), "steps", run.took, "vmm_start", time.Since(began).Round(time.Millisecond))
	report.Report(progress.Event{Phase: "vmm", Item: vm.VMM, Done: true, Message: fmt.Sprintf("pid %d", h.PID)})
	return nil
}

// monitorSpec is the VM monitor's spec for the VM of run.
// It is contained (console log cap, the unprivileged QEMU user).
func (s *Service) monitorSpec(run *startRun) (vmm.Spec, error) {
	vm := run.vm
	rtDir := s.RuntimeDir(vm.ID)
	spec := vmm.Spec{
		VMID: vm.ID, Name: vm.Name, CPUs: vm.CPUs, MemoryMiB: vm.MemoryMiB,
		Kernel: run.kernel, Initrd: run.initrd, Cmdline: s.cmdline(vm, run.nc, run.initrd, run.noEgress),
		Disk: run.disk.Path, Tap: vm.Runtime.Tap.Name, MAC: vm.MAC, RuntimeDir: rtDir,
		ConsoleLog: s.ConsoleLog(vm.ID), AgentSocket: filepath.Join(rtDir, "agent.sock"),
		VsockCID: vsockCID(vm.IP),
	}
	if err := s.contain(&spec, vm.VMM); err != nil {
		return spec, err
	}
	return spec, nil
}

// confirmMonitor records a started monitor on the VM: its handle in
// VM.Runtime (and handles.json), the start time and the kernel command
// line, in one store update. also, when set, changes the record in the
// same update (a restore's phase and snapshot: a daemon that dies just
// after must not find a restored VM recorded as booted).
func (s *Service) confirmMonitor(id string, h vmm.Handle, spec vmm.Spec, also func(*model.VM)) (model.VM, error) {
	if err := failpoint.Injected("start:confirm"); err != nil {
		return model.VM{}, err
	}
	vm, err := s.store.UpdateVM(id, func(v *model.VM) error {
		if h.AgentCID == 0 {
			h.AgentCID = spec.VsockCID
		}
		v.Runtime.Phase, v.Runtime.Monitor = "running", h
		v.StartedAt, v.KernelCmdline = time.Now().UTC(), spec.Cmdline
		if also != nil {
			also(v)
		}
		return nil
	})
	if err != nil {
		return vm, err
	}
	if err := s.WriteHandles(vm); err != nil {
		return vm, fmt.Errorf("write handles.json: %w", err)
	}
	return vm, nil
}

// vsockCID derives a guest CID (>= 3) from the VM's IP, unique per subnet.
func vsockCID(ip string) uint32 {
	a, err := netip.ParseAddr(ip)
	if err != nil || !a.Is4() {
		return 3
	}
	b := a.As4()
	return 1000 + uint32(b[2])<<8 + uint32(b[3])
}

// ensureNetwork makes the bridge and the NAT table exist. egress says
// whether guests can reach beyond the host: forwarding and NAT are in
// place and the host has a route out (netctl.HasUplink).
func (s *Service) ensureNetwork(ctx context.Context, nc netctl.Config) (egress bool, err error) {
	s.netMu.Lock()
	defer s.netMu.Unlock()
	if err := netctl.EnsureBridge(ctx, nc); err != nil {
		return false, fmt.Errorf("create bridge %s: %w", nc.Bridge, err)
	}
	egress = true
	if err := netctl.EnableIPForward(); err != nil {
		s.log.Warn("cannot enable ip_forward: guests will not reach beyond the host", "err", err)
		egress = false
	}
	if err := netctl.EnsureNAT(ctx, nc, ""); err != nil {
		s.log.Warn("cannot set up NAT: guests will not reach beyond the host", "err", err)
		egress = false
	}
	if up, err := netctl.HasUplink(nc); err != nil {
		s.log.Debug("cannot read the host's routes; the guest will probe its way out itself", "err", err)
	} else if !up {
		s.log.Debug("the host has no route out: guests are told they reach nothing beyond it")
		egress = false
	}
	return egress, nil
}

// ReleaseNetworkIfIdle removes banger's nftables table once no VM runs, so
// that a host without VMs carries no banger rules: after a stop, a failed
// start, a monitor exit, and at start-up. The bridge stays. It is the one
// place the NAT table is removed.
func (s *Service) ReleaseNetworkIfIdle(ctx context.Context) {
	s.netMu.Lock()
	defer s.netMu.Unlock()
	vms, err := s.store.ListVMs(nil)
	if err != nil {
		return
	}
	for _, vm := range vms {
		switch vm.State {
		case model.VMRunning, model.VMStarting, model.VMStopping:
			return
		}
	}
	st, err := netctl.InspectNAT(ctx)
	if err != nil {
		s.log.Debug("cannot read nftables; skipping the NAT table check", "err", err)
		return
	}
	if !st.Present {
		return
	}
	if err := netctl.RemoveNAT(ctx); err != nil {
		s.log.Warn("cannot remove the nftables table", "table", netctl.NATTable, "err", err)
		return
	}
	s.log.Info("removed the nftables table: no VM runs", "table", netctl.NATTable, "rules", len(st.Rules))
}

// bootArtifacts returns the kernel and initrd a VM boots.
func (s *Service) bootArtifacts(vm model.VM) (kernel, initrd string, err error) {
	img, err := s.store.GetImage(vm.ImageID)
	if err != nil {
		return "", "", fmt.Errorf("image of VM %q: %w", vm.Name, err)
	}
	if img.Boot != nil && (vm.Kernel == "" || vm.Kernel == img.Kernel) {
		return img.Boot.Kernel, img.Boot.Initrd, nil
	}
	if vm.Kernel == "" {
		return "", "", api.Errorf(api.CodeInvalid, "VM %q has no kernel: its image %q was pulled without --kernel-ref; recreate the VM with --kernel-ref", vm.Name, img.Name)
	}
	k, err := s.store.GetKernel(vm.Kernel)
	if err != nil {
		return "", "", fmt.Errorf("kernel of VM %q: %w", vm.Name, err)
	}
	if k.Initrd != nil {
		initrd = k.Initrd.Path
	}
	return k.Kernel.Path, initrd, nil
}
