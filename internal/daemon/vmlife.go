package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/atomicfile"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/qemu"
)

// gracefulStop is how long a guest gets to shut down on request before its
// monitor is told to quit.
var gracefulStop = 30 * time.Second

// live is what the daemon holds in memory for a started VM: the watcher of
// its monitor process and the boot waiter.
type live struct {
	cancel   context.CancelFunc // stops the watcher and the boot waiter
	stopping bool               // set while the daemon itself stops the VM
	ready    chan struct{}      // closed when the boot waiter ends
	readyErr error
}

type liveSet struct {
	mu sync.Mutex
	m  map[string]*live
}

func (s *liveSet) set(id string, l *live) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]*live{}
	}
	s.m[id] = l
}

// take removes and returns the entry of id.
func (s *liveSet) take(id string) *live {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.m[id]
	delete(s.m, id)
	return l
}

// vmDir is where a VM's persistent files live (disk, console log).
func (d *Daemon) vmDir(id string) string { return filepath.Join(d.cfg.VMsDir(), id) }

// vmRuntimeDir is where a running VM's sockets and handles.json live.
func (d *Daemon) vmRuntimeDir(id string) string {
	return filepath.Join(d.cfg.RuntimeDir, "vms", id)
}

func (d *Daemon) consoleLog(id string) string { return filepath.Join(d.vmDir(id), "console.log") }

func (d *Daemon) netConfig() (netctl.Config, error) {
	subnet, err := netip.ParsePrefix(d.cfg.Subnet)
	if err != nil {
		return netctl.Config{}, fmt.Errorf("config subnet %q: %w", d.cfg.Subnet, err)
	}
	c := netctl.Config{Bridge: d.cfg.Bridge, Subnet: subnet}.WithDefaults()
	return c, c.Validate()
}

func (d *Daemon) disks() *blockdev.Manager {
	return &blockdev.Manager{StateDir: d.cfg.StateDir}
}

// monitor returns the VM monitor backend of the given name, configured.
func (d *Daemon) monitor(name string) (vmm.Monitor, error) {
	switch name {
	case firecracker.Name:
		m := firecracker.New()
		if d.cfg.FirecrackerBinary != "" {
			m.Binary = d.cfg.FirecrackerBinary
		}
		m.Args = append([]string(nil), d.cfg.FirecrackerArgs...)
		return m, nil
	case qemu.Name:
		m := qemu.New()
		if d.cfg.QEMUBinary != "" {
			m.Binary = d.cfg.QEMUBinary
		}
		return m, nil
	}
	return vmm.Get(name)
}

// handleOf rebuilds the monitor handle persisted in rt.
func handleOf(rt model.Runtime) vmm.Handle {
	return vmm.Handle{PID: rt.PID, PIDStart: rt.PIDStart, BootID: rt.BootID, Cmdline: rt.Cmdline,
		APISocket: rt.APISocket, AgentSocket: rt.AgentSocket, AgentTransport: rt.AgentTransport, AgentCID: rt.VsockCID}
}

// diskOf rebuilds the disk persisted in rt.
func diskOf(vm model.VM) blockdev.Disk {
	rt := vm.Runtime
	return blockdev.Disk{Driver: vm.DiskDriver, Path: rt.DiskPath, COWPath: rt.COWPath, BaseLink: rt.BaseLink,
		Loops: rt.Loops, DMName: rt.DMName, DMUUID: rt.DMUUID}
}

// Handles is the content of a running VM's handles.json: everything needed
// to tear it down without the store.
type Handles struct {
	VMID    string        `json:"vm_id"`
	Written time.Time     `json:"written"`
	Runtime model.Runtime `json:"runtime"`
}

func (d *Daemon) handlesPath(id string) string {
	return filepath.Join(d.vmRuntimeDir(id), "handles.json")
}

// writeHandles writes handles.json atomically into the VM's runtime dir.
func (d *Daemon) writeHandles(vm model.VM) error {
	dir := d.vmRuntimeDir(vm.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	raw, err := json.MarshalIndent(Handles{VMID: vm.ID, Written: time.Now().UTC(), Runtime: vm.Runtime}, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(d.handlesPath(vm.ID), raw, 0o600)
}

// setRuntime records rt on the VM (intent or confirmation) and mirrors it
// into handles.json.
func (d *Daemon) setRuntime(id string, fn func(*model.Runtime)) (model.VM, error) {
	vm, err := d.store.UpdateVM(id, func(vm *model.VM) error {
		fn(&vm.Runtime)
		return nil
	})
	if err != nil {
		return vm, err
	}
	if vm.Runtime.RuntimeDir != "" {
		if err := d.writeHandles(vm); err != nil {
			return vm, fmt.Errorf("write handles.json: %w", err)
		}
	}
	return vm, nil
}

// setState moves the VM to state st with reason.
func (d *Daemon) setState(id string, st model.VMState, reason string, extra func(*model.VM)) (model.VM, error) {
	return d.store.UpdateVM(id, func(vm *model.VM) error {
		vm.State, vm.Reason = st, reason
		switch st {
		case model.VMStopped, model.VMError:
			vm.StoppedAt = time.Now().UTC()
		}
		if extra != nil {
			extra(vm)
		}
		return nil
	})
}

var netOnce sync.Mutex

// ensureNetwork makes the bridge and the NAT table exist.
func (d *Daemon) ensureNetwork(ctx context.Context, nc netctl.Config) error {
	netOnce.Lock()
	defer netOnce.Unlock()
	if err := netctl.EnsureBridge(ctx, nc); err != nil {
		return fmt.Errorf("create bridge %s: %w", nc.Bridge, err)
	}
	if err := netctl.EnableIPForward(); err != nil {
		d.log.Warn("cannot enable ip_forward: guests will not reach beyond the host", "err", err)
	}
	if err := netctl.EnsureNAT(ctx, nc, ""); err != nil {
		d.log.Warn("cannot set up NAT: guests will not reach beyond the host", "err", err)
	}
	return nil
}

// releaseNetworkIfIdle removes banger's nftables table once no VM runs, so
// that a host without VMs carries no banger rules: after a stop, a failed
// start, a monitor exit, and at start-up. The bridge stays. It is the one
// place the NAT table is removed.
func (d *Daemon) releaseNetworkIfIdle(ctx context.Context) {
	netOnce.Lock()
	defer netOnce.Unlock()
	vms, err := d.store.ListVMs(nil)
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
		d.log.Debug("cannot read nftables; skipping the NAT table check", "err", err)
		return
	}
	if !st.Present {
		return
	}
	if err := netctl.RemoveNAT(ctx); err != nil {
		d.log.Warn("cannot remove the nftables table", "table", netctl.NATTable, "err", err)
		return
	}
	d.log.Info("removed the nftables table: no VM runs", "table", netctl.NATTable, "rules", len(st.Rules))
}

// bootArtifacts returns the kernel and initrd a VM boots.
func (d *Daemon) bootArtifacts(vm model.VM) (kernel, initrd string, err error) {
	img, err := d.store.GetImage(vm.ImageID)
	if err != nil {
		return "", "", fmt.Errorf("image of VM %q: %w", vm.Name, err)
	}
	if img.Boot != nil && (vm.Kernel == "" || vm.Kernel == img.Kernel) {
		return img.Boot.Kernel, img.Boot.Initrd, nil
	}
	if vm.Kernel == "" {
		return "", "", api.Errorf(api.CodeInvalid, "VM %q has no kernel: its image %q was pulled without --kernel-ref; recreate the VM with --kernel-ref", vm.Name, img.Name)
	}
	k, err := d.store.GetKernel(vm.Kernel)
	if err != nil {
		return "", "", fmt.Errorf("kernel of VM %q: %w", vm.Name, err)
	}
	if k.Initrd != nil {
		initrd = k.Initrd.Path
	}
	return k.Kernel.Path, initrd, nil
}

// startVM starts a created or stopped VM. It reads as its steps:
// beginStart (mark it starting) → prepareDisk → attachNetwork →
// launchMonitor → supervise. Each step records a resource in VM.Runtime
// before it creates it; when a step fails, failStart releases everything
// made so far and the VM goes to error. The boot waiter then runs in the
// background; when wait is true startVM waits for it.
func (d *Daemon) startVM(ctx context.Context, idOrName string, sshKey string, wait bool, report progress.Func) (model.VM, error) {
	vm, err := d.store.GetVM(idOrName)
	if err != nil {
		return vm, err
	}
	mu := d.vmLock(vm.ID)
	mu.Lock()
	run, err := d.beginStart(ctx, vm.ID, sshKey)
	if err != nil {
		mu.Unlock()
		return run.vm, err
	}
	l, err := d.runStart(ctx, run, report, d.prepareDisk, d.attachNetwork, d.launchMonitor)
	mu.Unlock()
	if err != nil || !wait {
		return run.vm, err
	}
	return d.waitReady(ctx, run.vm, l, report)
}

// startStep is one step of a start; it updates run.vm as it records.
type startStep func(context.Context, *startRun, progress.Func) error

// runStart runs the steps of a start in order, then supervises the VM. The
// first step that fails ends the start: failStart releases what the steps
// made and the VM goes to error, so no monitor is ever left running
// without a watcher.
func (d *Daemon) runStart(ctx context.Context, run *startRun, report progress.Func, steps ...startStep) (*live, error) {
	for _, step := range steps {
		if err := step(ctx, run, report); err != nil {
			run.vm, err = d.failStart(ctx, run, err)
			return nil, err
		}
	}
	return d.watch(run.vm), nil
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
func (d *Daemon) beginStart(ctx context.Context, id, sshKey string) (*startRun, error) {
	vm, err := d.store.GetVM(id)
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
		if _, err := d.releaseRuntime(ctx, vm, false); err != nil {
			return run, fmt.Errorf("VM %q holds resources from an earlier run that cannot be released: %w", vm.Name, err)
		}
	}
	if run.kernel, run.initrd, err = d.bootArtifacts(vm); err != nil {
		return run, err
	}
	if run.mon, err = d.monitor(vm.VMM); err != nil {
		return run, err
	}
	if run.nc, err = d.netConfig(); err != nil {
		return run, err
	}
	run.log = d.log.With("vm", vm.Name, "id", vm.ID)
	rtDir := d.vmRuntimeDir(vm.ID)
	err = run.record(d.store.UpdateVM(vm.ID, func(v *model.VM) error {
		v.State, v.Reason, v.FirstBoot, v.FirstBootLog = model.VMStarting, "", "", nil
		if sshKey != "" {
			v.SSHKey = sshKey
		}
		v.Runtime = model.Runtime{Phase: "runtime-dir", RuntimeDir: rtDir, ConsoleLog: d.consoleLog(v.ID)}
		return nil
	}))
	if err != nil {
		return run, err
	}
	failpoint("start:starting")
	for _, dir := range []string{rtDir, d.vmDir(vm.ID)} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return d.failedBegin(ctx, run, err)
		}
	}
	if err := d.writeHandles(run.vm); err != nil {
		return d.failedBegin(ctx, run, err)
	}
	return run, nil
}

// failedBegin undoes a beginStart that marked the VM starting.
func (d *Daemon) failedBegin(ctx context.Context, run *startRun, cause error) (*startRun, error) {
	var err error
	run.vm, err = d.failStart(ctx, run, cause)
	return run, err
}

// failStart releases what a start made and moves the VM to error with the
// cause.
func (d *Daemon) failStart(ctx context.Context, run *startRun, cause error) (model.VM, error) {
	vm := run.vm
	d.log.Warn("start failed; releasing what it made", "vm", vm.Name, "id", vm.ID, "err", cause)
	cur, err := d.store.GetVM(vm.ID)
	if err != nil {
		cur = vm
	}
	reason := "start failed: " + cause.Error()
	out, _ := d.releaseAndMark(ctx, cur, mark{state: model.VMError, reason: reason, failed: func(err error) string {
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
func (d *Daemon) prepareDisk(ctx context.Context, run *startRun, report progress.Func) error {
	vm := run.vm
	report.Report(progress.Event{Phase: "disk", Item: vm.DiskDriver})
	img, err := d.store.GetImage(vm.ImageID)
	if err != nil {
		return err
	}
	disk, err := d.disks().Prepare(ctx, blockdev.PrepareOptions{
		VMID: vm.ID, BaseImage: img.RootFS, VMDir: d.vmDir(vm.ID), SizeBytes: vm.DiskBytes, Driver: vm.DiskDriver,
		Intent: func(dk blockdev.Disk) error {
			_, err := d.setRuntime(vm.ID, func(rt *model.Runtime) { setDisk(rt, dk, "disk:creating") })
			return err
		},
	})
	if err != nil {
		return fmt.Errorf("prepare disk: %w", err)
	}
	if err := run.record(d.setRuntime(vm.ID, func(rt *model.Runtime) { setDisk(rt, disk, "disk:ready") })); err != nil {
		return err
	}
	run.disk = disk
	failpoint("start:disk")
	return nil
}

// attachNetwork makes sure the bridge and NAT exist, then creates the VM's
// tap (recorded first).
func (d *Daemon) attachNetwork(ctx context.Context, run *startRun, report progress.Func) error {
	vm := run.vm
	report.Report(progress.Event{Phase: "network", Item: vm.Name})
	if err := d.ensureNetwork(ctx, run.nc); err != nil {
		return err
	}
	tapName := netctl.TapName(vm.ID)
	if err := run.record(d.setRuntime(vm.ID, func(rt *model.Runtime) {
		rt.Phase, rt.Tap, rt.TapAlias = "tap:creating", tapName, netctl.TapAlias(vm.ID)
	})); err != nil {
		return err
	}
	failpoint("start:tap-intent")
	if _, err := netctl.CreateTap(ctx, run.nc, vm.ID); err != nil {
		return fmt.Errorf("create tap %s: %w", tapName, err)
	}
	if err := run.record(d.setRuntime(vm.ID, func(rt *model.Runtime) { rt.Phase = "vmm:starting" })); err != nil {
		return err
	}
	failpoint("start:tap")
	return nil
}

// launchMonitor starts the VM monitor and confirms it in the record. A
// monitor whose handle cannot be recorded is stopped before the error is
// returned: nothing would watch it.
func (d *Daemon) launchMonitor(ctx context.Context, run *startRun, report progress.Func) error {
	vm := run.vm
	report.Report(progress.Event{Phase: "vmm", Item: vm.VMM})
	rtDir := d.vmRuntimeDir(vm.ID)
	spec := vmm.Spec{
		VMID: vm.ID, Name: vm.Name, CPUs: vm.CPUs, MemoryMiB: vm.MemoryMiB,
		Kernel: run.kernel, Initrd: run.initrd, Cmdline: d.cmdline(vm, run.nc, run.initrd),
		Disk: run.disk.Path, Tap: vm.Runtime.Tap, MAC: vm.MAC, RuntimeDir: rtDir,
		ConsoleLog: d.consoleLog(vm.ID), AgentSocket: filepath.Join(rtDir, "agent.sock"),
		VsockCID: vm.Runtime.VsockCID,
	}
	if spec.VsockCID == 0 {
		spec.VsockCID = vsockCID(vm.IP)
	}
	h, err := run.mon.Start(ctx, spec)
	if err != nil {
		return fmt.Errorf("start %s: %w", vm.VMM, err)
	}
	failpoint("start:vmm")
	// Confirm the monitor in one update: its handle, the start time and
	// the command line. Until it is stored nothing watches the monitor, so
	// a failure here stops it before the rest is released.
	if err := run.record(d.confirmMonitor(vm.ID, h, spec)); err != nil {
		_, _ = run.mon.Stop(context.WithoutCancel(ctx), h, 0)
		return fmt.Errorf("record the VM monitor: %w", err)
	}
	failpoint("start:recorded")
	run.log.Info("VM monitor started", "vmm", vm.VMM, "pid", h.PID, "disk", run.disk.Driver, "tap", vm.Runtime.Tap, "ip", vm.IP,
		"start_overhead", time.Since(run.began).Round(time.Millisecond))
	report.Report(progress.Event{Phase: "vmm", Item: vm.VMM, Done: true, Message: fmt.Sprintf("pid %d", h.PID)})
	return nil
}

// confirmMonitor records a started monitor on the VM: its handle in
// VM.Runtime (and handles.json), the start time and the kernel command
// line, in one store update.
func (d *Daemon) confirmMonitor(id string, h vmm.Handle, spec vmm.Spec) (model.VM, error) {
	if err := injected("start:confirm"); err != nil {
		return model.VM{}, err
	}
	vm, err := d.store.UpdateVM(id, func(v *model.VM) error {
		rt := &v.Runtime
		rt.Phase = "running"
		rt.PID, rt.PIDStart, rt.BootID, rt.Cmdline = h.PID, h.PIDStart, h.BootID, h.Cmdline
		rt.APISocket, rt.AgentSocket, rt.AgentTransport, rt.VsockCID = h.APISocket, h.AgentSocket, h.AgentTransport, spec.VsockCID
		v.StartedAt, v.KernelCmdline = time.Now().UTC(), spec.Cmdline
		return nil
	})
	if err != nil {
		return vm, err
	}
	if err := d.writeHandles(vm); err != nil {
		return vm, fmt.Errorf("write handles.json: %w", err)
	}
	return vm, nil
}

func setDisk(rt *model.Runtime, dk blockdev.Disk, phase string) {
	rt.Phase = phase
	rt.DiskPath, rt.COWPath, rt.BaseLink, rt.Loops, rt.DMName, rt.DMUUID = dk.Path, dk.COWPath, dk.BaseLink, dk.Loops, dk.DMName, dk.DMUUID
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

// watch starts the watcher and the boot waiter of a started (or
// re-adopted) VM.
func (d *Daemon) watch(vm model.VM) *live {
	ctx, cancel := context.WithCancel(d.bgCtx)
	l := &live{cancel: cancel, ready: make(chan struct{})}
	if old := d.lives.take(vm.ID); old != nil {
		old.cancel()
	}
	d.lives.set(vm.ID, l)
	go d.watchMonitor(ctx, vm, l)
	if vm.State == model.VMStarting {
		go func() {
			l.readyErr = d.bootWait(ctx, vm)
			close(l.ready)
		}()
	} else {
		close(l.ready)
	}
	return l
}

// watchMonitor notices a monitor process that exits on its own (guest
// poweroff, crash, kill from outside) and releases the VM's resources.
func (d *Daemon) watchMonitor(ctx context.Context, vm model.VM, l *live) {
	mon, err := d.monitor(vm.VMM)
	if err != nil {
		return
	}
	h := handleOf(vm.Runtime)
	t := time.NewTicker(300 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		alive, err := mon.Alive(h)
		if err != nil || alive {
			continue
		}
		mu := d.vmLock(vm.ID)
		mu.Lock()
		if ctx.Err() != nil || l.stopping {
			mu.Unlock()
			return
		}
		cur, err := d.store.GetVM(vm.ID)
		if err != nil || cur.Runtime.PID != h.PID {
			mu.Unlock()
			return
		}
		d.log.Info("VM monitor exited on its own; releasing the VM's resources", "vm", cur.Name, "pid", h.PID)
		m := mark{state: model.VMStopped, failed: func(err error) string {
			return "the VM monitor exited and cleanup failed: " + err.Error()
		}}
		if cur.State == model.VMStarting {
			m.state, m.reason = model.VMError, "the VM monitor exited while the guest was booting: see banger vm logs "+cur.Name
		}
		_, _ = d.releaseAndMark(d.bgCtx, cur, m)
		d.lives.take(vm.ID)
		l.cancel()
		mu.Unlock()
		return
	}
}

// agentDial returns how to reach the VM's agent.
func agentDial(rt model.Runtime) agent.DialFunc {
	return func(ctx context.Context) (*agent.Client, error) {
		switch agent.Transport(rt.AgentTransport) {
		case agent.TransportVsock:
			return agent.Dial(ctx, agent.TransportVsock, fmt.Sprint(rt.VsockCID))
		default:
			return agent.Dial(ctx, agent.Transport(rt.AgentTransport), rt.AgentSocket)
		}
	}
}

// bootWait waits until the guest is ready for ssh: the agent answers, the
// owner's key is authorized, first boot has finished, the host key is
// known and sshd accepts connections. It moves the VM to running, or to
// error (releasing its resources) when the healthy timeout passes.
func (d *Daemon) bootWait(ctx context.Context, vm model.VM) error {
	timeout := time.Duration(d.cfg.HealthyTimeout)
	if timeout <= 0 {
		timeout = 5 * time.Minute
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := d.waitAgent(wctx, vm)
	if ctx.Err() != nil {
		return ctx.Err() // stopped or daemon shutting down: not our call
	}
	if err == nil {
		return nil
	}
	mu := d.vmLock(vm.ID)
	mu.Lock()
	defer mu.Unlock()
	cur, gerr := d.store.GetVM(vm.ID)
	if gerr != nil || cur.State != model.VMStarting || cur.Runtime.PID != vm.Runtime.PID {
		return err
	}
	reason := fmt.Sprintf("the guest did not become ready within %s: %v (console log: banger vm logs %s)", timeout, err, vm.Name)
	d.log.Warn("VM not ready; stopping it", "vm", vm.Name, "err", err)
	if l := d.lives.take(vm.ID); l != nil {
		l.stopping = true
		l.cancel()
	}
	out, _ := d.releaseAndMark(d.bgCtx, cur, mark{state: model.VMError, reason: reason, failed: func(err error) string {
		return reason + "; cleanup: " + err.Error()
	}})
	if out.Reason != "" {
		reason = out.Reason
	}
	return errors.New(reason)
}

func (d *Daemon) waitAgent(ctx context.Context, vm model.VM) error {
	dial := agentDial(vm.Runtime)
	var c *agent.Client
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		cl, err := dial(cctx)
		cancel()
		if err == nil {
			c = cl
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the agent never answered (last error: %w)", err)
		case <-time.After(500 * time.Millisecond):
		}
	}
	defer c.Close()
	if _, err := c.Health(ctx); err != nil {
		return fmt.Errorf("agent health: %w", err)
	}
	d.log.Info("guest agent healthy", "vm", vm.Name)
	if vm.SSHKey != "" {
		if _, err := c.AuthorizeKey(ctx, vm.SSHKey); err != nil {
			return fmt.Errorf("authorize ssh key: %w", err)
		}
	}
	var st *agent.Status
	for {
		s, err := c.Status(ctx)
		if err != nil {
			return fmt.Errorf("agent status: %w", err)
		}
		st = s
		_, _ = d.store.UpdateVM(vm.ID, func(v *model.VM) error {
			v.FirstBoot = string(s.FirstBoot)
			return nil
		})
		if s.FirstBoot == agent.FirstBootFailed {
			break
		}
		// Skipped: banger's PID 1 found no sshd to install (or no way to):
		// the agent's SSH server is the way in, ready now.
		if s.FirstBoot == agent.FirstBootSkipped {
			break
		}
		booted := s.FirstBoot == agent.FirstBootDone || s.FirstBoot == agent.FirstBootUnknown
		if booted && d.cfg.ReadyCheck == "agent" {
			break
		}
		if booted && s.HostKey != "" && sshOpen(ctx, vm.IP) {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("first boot is %s and sshd is not ready yet", s.FirstBoot)
		case <-time.After(readyPoll):
		}
	}
	_, err := d.store.UpdateVM(vm.ID, func(v *model.VM) error {
		if v.State == model.VMStarting {
			v.State = model.VMRunning
		}
		v.FirstBoot = string(st.FirstBoot)
		recordGuestStatus(v, st)
		if st.HostKey != "" {
			v.HostKey = strings.TrimSpace(st.HostKey)
		}
		if st.FirstBoot == agent.FirstBootFailed {
			v.FirstBootLog = st.FirstBootLog
			v.Reason = "first boot failed to install openssh-server; it retries at the next boot (see first_boot_log)"
		}
		return nil
	})
	if err == nil {
		d.log.Info("VM ready", "vm", vm.Name, "first_boot", st.FirstBoot)
	}
	return err
}

func sshOpen(ctx context.Context, ip string) bool {
	if ip == "" {
		return true
	}
	var dl net.Dialer
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := dl.DialContext(cctx, "tcp", net.JoinHostPort(ip, "22"))
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

// waitReady waits for the boot waiter of l, reporting progress.
func (d *Daemon) waitReady(ctx context.Context, vm model.VM, l *live, report progress.Func) (model.VM, error) {
	report.Report(progress.Event{Phase: "boot", Item: vm.Name, Message: "waiting for the guest agent and sshd"})
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	start := time.Now()
	for {
		select {
		case <-l.ready:
			cur, err := d.store.GetVM(vm.ID)
			if err != nil {
				return cur, err
			}
			if l.readyErr != nil || cur.State != model.VMRunning {
				msg := cur.Reason
				if msg == "" && l.readyErr != nil {
					msg = l.readyErr.Error()
				}
				return cur, fmt.Errorf("VM %q did not become ready: %s", vm.Name, msg)
			}
			report.Report(progress.Event{Phase: "boot", Item: vm.Name, Done: true, Message: fmt.Sprintf("ready in %s", time.Since(start).Round(100*time.Millisecond))})
			return cur, nil
		case <-ctx.Done():
			return vm, api.Errorf(api.CodeCanceled, "stopped waiting for VM %q; it keeps booting (banger vm ls shows when it is running)", vm.Name)
		case <-t.C:
			cur, _ := d.store.GetVM(vm.ID)
			msg := "waiting for the guest agent"
			if cur.FirstBoot != "" {
				msg = "first boot: " + cur.FirstBoot
			}
			report.Report(progress.Event{Phase: "boot", Item: vm.Name, Message: msg + fmt.Sprintf(" (%s)", time.Since(start).Round(time.Second))})
		}
	}
}

// stopVM stops a VM: a graceful shutdown, then the monitor's escalation;
// then it releases the tap and deactivates the disk (kept for the next
// start). Stopping a stopped VM is a success.
func (d *Daemon) stopVM(ctx context.Context, idOrName string, report progress.Func) (model.VM, error) {
	vm, err := d.store.GetVM(idOrName)
	if err != nil {
		return vm, err
	}
	mu := d.vmLock(vm.ID)
	mu.Lock()
	defer mu.Unlock()
	vm, err = d.store.GetVM(vm.ID)
	if err != nil {
		return vm, err
	}
	if vm.State == model.VMCreated || (vm.State == model.VMStopped && vm.Runtime.Empty()) {
		return vm, nil
	}
	if l := d.lives.take(vm.ID); l != nil {
		l.stopping = true
		l.cancel()
	}
	prev := vm.State
	if vm, err = d.setState(vm.ID, model.VMStopping, "", nil); err != nil {
		return vm, err
	}
	failpoint("stop:stopping")
	report.Report(progress.Event{Phase: "stop", Item: vm.Name})
	m := mark{state: model.VMStopped, failpoint: "stop:released", failed: func(err error) string { return "stop: " + err.Error() }}
	if prev == model.VMError {
		m.reason = vm.Reason
	}
	out, err := d.releaseAndMark(ctx, vm, m)
	if err != nil {
		return out, fmt.Errorf("stop VM %q: %w", vm.Name, err)
	}
	report.Report(progress.Event{Phase: "stop", Item: vm.Name, Done: true})
	d.log.Info("VM stopped", "vm", vm.Name, "released", strings.Join(out.Recovery.Removed, ", "))
	return out, nil
}

// cleanupTimeout bounds releasing a VM's resources.
const cleanupTimeout = 2 * time.Minute

// mark is what releaseAndMark records once the release is done: state and
// reason when everything was released, VMError with failed(err) when not.
type mark struct {
	state  model.VMState
	reason string
	failed func(err error) string
	// also are resources released before the call (stray monitors), named
	// in Recovery.Removed with the rest.
	also []string
	// failpoint is reached between the release and the record.
	failpoint string
}

// releaseAndMark releases what vm.Runtime holds and records the outcome:
// the state of m, the runtime cleared, and what was removed in Recovery.
// When the release fails the VM goes to error with m.failed's reason and
// keeps its runtime, so the next start or start-up retries from it; the
// error is returned. It runs on its own cleanup context (ctx's values, not
// its cancellation, bounded by cleanupTimeout), so that a canceled request
// or a daemon shutting down never leaves a release half done; it then
// releases the network when no VM runs any more.
func (d *Daemon) releaseAndMark(ctx context.Context, vm model.VM, m mark) (model.VM, error) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	removed, rerr := d.releaseRuntime(cctx, vm, false)
	removed = append(m.also, removed...)
	if m.failpoint != "" && rerr == nil {
		failpoint(m.failpoint)
	}
	st, reason := m.state, m.reason
	if rerr != nil {
		st, reason = model.VMError, m.failed(rerr)
	}
	out, err := d.setState(vm.ID, st, reason, func(v *model.VM) {
		v.Recovery.CleanedAt, v.Recovery.Removed = time.Now().UTC(), removed
		if rerr == nil {
			v.Runtime = model.Runtime{ConsoleLog: v.Runtime.ConsoleLog}
		}
	})
	d.releaseNetworkIfIdle(cctx)
	if rerr != nil {
		return out, rerr
	}
	return out, err
}

// agentShutdown asks the guest agent to power the guest off (images
// without an ACPI power-button handler, such as minimal systemd images
// without logind, ignore the monitor's request) and waits for the monitor
// to exit. It reports whether the monitor is gone.
func (d *Daemon) agentShutdown(ctx context.Context, vm model.VM, mon vmm.Monitor) bool {
	rt := vm.Runtime
	h := handleOf(rt)
	if alive, _ := mon.Alive(h); !alive || rt.AgentTransport == "" {
		return false
	}
	dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	c, err := agentDial(rt)(dctx)
	cancel()
	if err != nil {
		return false
	}
	sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	method, err := c.Shutdown(sctx)
	cancel()
	_ = c.Close()
	if err != nil {
		d.log.Debug("agent shutdown refused; using the monitor's", "vm", vm.Name, "err", err)
		return false
	}
	gone := vmm.WaitGone(ctx, h, gracefulStop)
	d.log.Info("guest powered off through its agent", "vm", vm.Name, "method", method, "gone", gone)
	return gone
}

// releaseRuntime tears down what vm.Runtime holds: the monitor (only when
// its pid still is the process banger started), the disk's devices (and
// its files when removeDisk), the tap (only with banger's alias for this
// VM), the runtime dir. Every step is idempotent and runs even when an
// earlier one failed; it returns what it removed and the joined errors.
func (d *Daemon) releaseRuntime(ctx context.Context, vm model.VM, removeDisk bool) ([]string, error) {
	// Act only on what provably is this VM's, whatever the record says.
	rt, refused := d.ownRuntime(vm.ID, vm.Runtime)
	for _, r := range refused {
		d.log.Warn("cleanup refuses a resource the VM's record names but banger cannot prove it made", "vm", vm.Name, "refused", r)
	}
	vm.Runtime = rt
	var removed []string
	var errs []error
	if rt.PID != 0 {
		if mon, err := d.monitor(vm.VMM); err != nil {
			errs = append(errs, err)
		} else {
			graceful := gracefulStop
			if d.agentShutdown(ctx, vm, mon) {
				// The guest is powering off; the monitor's own escalation
				// only has to catch a guest that hangs on the way down.
				graceful = 3 * time.Second
			}
			how, err := mon.Stop(ctx, handleOf(rt), graceful)
			if err != nil {
				errs = append(errs, fmt.Errorf("stop %s pid %d: %w", vm.VMM, rt.PID, err))
			} else if how != vmm.StoppedAlready {
				removed = append(removed, fmt.Sprintf("%s pid %d (%s)", vm.VMM, rt.PID, how))
			}
		}
	}
	dk := diskOf(vm)
	if dk.DMName != "" || len(dk.Loops) > 0 || (removeDisk && (dk.COWPath != "" || dk.Path != "" || dk.BaseLink != "")) {
		var err error
		if removeDisk {
			err = d.disks().Teardown(ctx, dk)
		} else {
			err = d.disks().Deactivate(ctx, dk)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("disk: %w", err))
		} else {
			if dk.DMName != "" {
				removed = append(removed, "dm "+dk.DMName)
			}
			for _, l := range dk.Loops {
				removed = append(removed, "loop "+l.Device)
			}
			if removeDisk && dk.COWPath != "" {
				removed = append(removed, "disk "+dk.COWPath)
			}
		}
	}
	if rt.Tap != "" {
		if err := netctl.DeleteTap(ctx, rt.Tap, vm.ID); err != nil {
			errs = append(errs, fmt.Errorf("tap %s: %w", rt.Tap, err))
		} else {
			removed = append(removed, "tap "+rt.Tap)
		}
	}
	// The runtime dir holds handles.json: it goes only once everything it
	// names is released, so that a failed cleanup can be retried from it.
	if len(errs) == 0 {
		if err := d.removeUnder(filepath.Join(d.cfg.RuntimeDir, "vms"), d.vmRuntimeDir(vm.ID)); err != nil {
			errs = append(errs, err)
		}
	}
	return removed, errors.Join(errs...)
}
