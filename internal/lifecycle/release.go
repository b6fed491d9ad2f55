package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/failpoint"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/subpath"
	"github.com/bangerdev/banger/internal/supervisor"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer"
)

// gracefulStop is how long a guest gets to shut down on request before its
// monitor is told to quit.
var gracefulStop = 30 * time.Second

// cleanupTimeout bounds releasing a VM's resources.
const cleanupTimeout = 2 * time.Minute

// Stop stops a VM: a graceful shutdown, then the monitor's escalation;
// then it releases the tap and deactivates the disk (kept for the next
// start). Stopping a stopped VM is a success.
func (s *Service) Stop(ctx context.Context, idOrName string, report progress.Func) (model.VM, error) {
	vm, err := s.store.GetVM(idOrName)
	if err != nil {
		return vm, err
	}
	mu := s.Lock(vm.ID)
	mu.Lock()
	defer mu.Unlock()
	vm, err = s.store.GetVM(vm.ID)
	if err != nil {
		return vm, err
	}
	if vm.State == model.VMCreated || (vm.State == model.VMStopped && vm.Runtime.Empty()) {
		return vm, nil
	}
	sup := s.sups.Take(vm.ID)
	if sup != nil {
		sup.Detach()
		defer sup.Close()
	}
	prev := vm.State
	if vm, err = s.SetState(vm.ID, model.VMStopping, "", nil); err != nil {
		return vm, err
	}
	failpoint.Reach("stop:stopping")
	report.Report(progress.Event{Phase: "stop", Item: vm.Name})
	m := Mark{State: model.VMStopped, Failpoint: "stop:released", Failed: func(err error) string { return "stop: " + err.Error() }}
	if prev == model.VMError {
		m.Reason = vm.Reason
	}
	out, err := s.ReleaseAndMark(ctx, vm, sup, m)
	if err != nil {
		return out, fmt.Errorf("stop VM %q: %w", vm.Name, err)
	}
	report.Report(progress.Event{Phase: "stop", Item: vm.Name, Done: true})
	s.log.Info("VM stopped", "vm", vm.Name, "released", strings.Join(out.Recovery.Removed, ", "))
	return out, nil
}

// Mark is what ReleaseAndMark records once the release is done: State and
// Reason when everything was released, VMError with Failed(err) when not.
type Mark struct {
	State  model.VMState
	Reason string
	Failed func(err error) string
	// Also are resources released before the call (stray monitors), named
	// in Recovery.Removed with the rest.
	Also []string
	// Failpoint is reached between the release and the record.
	Failpoint string
}

// ReleaseAndMark releases what vm.Runtime holds and records the outcome:
// the state of m, the runtime cleared, and what was removed in Recovery.
// When the release fails the VM goes to error with m.Failed's reason and
// keeps its runtime, so the next start or start-up retries from it; the
// error is returned. It runs on its own cleanup context (ctx's values, not
// its cancellation, bounded by cleanupTimeout), so that a canceled request
// or a daemon shutting down never leaves a release half done; it then
// releases the network when no VM runs any more. sup, when not nil, is the
// VM's supervisor, whose agent session asks the guest to power off.
func (s *Service) ReleaseAndMark(ctx context.Context, vm model.VM, sup *supervisor.Supervisor, m Mark) (model.VM, error) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	s.unpublish(vm.ID)
	s.detachMounts(vm.ID)
	removed, rerr := s.release(cctx, vm, sup, false)
	removed = append(m.Also, removed...)
	if m.Failpoint != "" && rerr == nil {
		failpoint.Reach(m.Failpoint)
	}
	st, reason := m.State, m.Reason
	if rerr != nil {
		st, reason = model.VMError, m.Failed(rerr)
	}
	out, err := s.SetState(vm.ID, st, reason, func(v *model.VM) {
		v.Recovery.CleanedAt, v.Recovery.Removed = time.Now().UTC(), removed
		if rerr == nil {
			v.Runtime = model.Runtime{ConsoleLog: v.Runtime.ConsoleLog}
		}
	})
	s.ReleaseNetworkIfIdle(cctx)
	if rerr != nil {
		return out, rerr
	}
	return out, err
}

// Release tears down what vm.Runtime holds (see release), with no
// supervisor to ask the guest through.
func (s *Service) Release(ctx context.Context, vm model.VM, removeDisk bool) ([]string, error) {
	return s.release(ctx, vm, nil, removeDisk)
}

// release tears down what vm.Runtime holds: the monitor (only when its pid
// still is the process banger started), the disk's devices (and its files
// when removeDisk), the tap (only with banger's alias for this VM), the
// runtime dir. Every step is idempotent and runs even when an earlier one
// failed; it returns what it removed and the joined errors.
func (s *Service) release(ctx context.Context, vm model.VM, sup *supervisor.Supervisor, removeDisk bool) ([]string, error) {
	// Act only on what provably is this VM's, whatever the record says.
	rt, refused := s.OwnRuntime(vm.ID, vm.Runtime)
	for _, r := range refused {
		s.log.Warn("cleanup refuses a resource the VM's record names but banger cannot prove it made", "vm", vm.Name, "refused", r)
	}
	vm.Runtime = rt
	var removed []string
	var errs []error
	if rt.Monitor.PID != 0 {
		if mon, err := s.Monitor(vm.VMM); err != nil {
			errs = append(errs, err)
		} else {
			graceful := gracefulStop
			if s.agentShutdown(ctx, vm, mon, sup) {
				// The guest is powering off; the monitor's own escalation
				// only has to catch a guest that hangs on the way down.
				graceful = 3 * time.Second
			}
			how, err := mon.Stop(ctx, rt.Monitor, graceful)
			if err != nil {
				errs = append(errs, fmt.Errorf("stop %s pid %d: %w", vm.VMM, rt.Monitor.PID, err))
			} else if how != vmm.StoppedAlready {
				removed = append(removed, fmt.Sprintf("%s pid %d (%s)", vm.VMM, rt.Monitor.PID, how))
			}
		}
	}
	if vm.VMM == firecracker.Name && s.cfg.Jailer() != nil && len(errs) == 0 {
		// The jail goes once its monitor is gone, also when the start died
		// before the monitor's pid was recorded (Stop removed it otherwise).
		mon, _ := s.Monitor(firecracker.Name)
		if err := mon.(*firecracker.Monitor).ReleaseJail(vm.ID); err != nil {
			errs = append(errs, fmt.Errorf("jail: %w", err))
		}
	}
	dk := rt.Disk
	if dk.DMName != "" || len(dk.Loops) > 0 || (removeDisk && (dk.COWPath != "" || dk.Path != "" || dk.BaseLink != "")) {
		var err error
		if removeDisk {
			err = s.Disks().Teardown(ctx, dk)
		} else {
			err = s.Disks().Deactivate(ctx, dk)
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
	if rt.Tap.Name != "" {
		if err := netctl.DeleteTap(ctx, rt.Tap.Name, vm.ID); err != nil {
			errs = append(errs, fmt.Errorf("tap %s: %w", rt.Tap.Name, err))
		} else {
			removed = append(removed, "tap "+rt.Tap.Name)
		}
	}
	// The runtime dir holds handles.json: it goes only once everything it
	// names is released, so that a failed cleanup can be retried from it.
	if len(errs) == 0 {
		if err := subpath.RemoveAll(s.RuntimeDirs(), s.RuntimeDir(vm.ID)); err != nil {
			errs = append(errs, err)
		}
	}
	return removed, errors.Join(errs...)
}

// agentShutdown asks the guest agent to power the guest off (images
// without an ACPI power-button handler, such as minimal systemd images
// without logind, ignore the monitor's request) and waits for the monitor
// to exit. It asks through the supervisor's session when there is one,
// else on a connection of its own. It reports whether the monitor is gone.
func (s *Service) agentShutdown(ctx context.Context, vm model.VM, mon vmm.Monitor, sup *supervisor.Supervisor) bool {
	h := vm.Runtime.Monitor
	if alive, _ := mon.Alive(h); !alive || h.AgentTransport == "" {
		return false
	}
	sctx, cancel := context.WithTimeout(ctx, 6*time.Second)
	method, err := s.askShutdown(sctx, h, sup)
	cancel()
	if err != nil {
		s.log.Debug("agent shutdown refused; using the monitor's", "vm", vm.Name, "err", err)
		return false
	}
	gone := vmm.WaitGone(ctx, h, gracefulStop)
	s.log.Info("guest powered off through its agent", "vm", vm.Name, "method", method, "gone", gone)
	return gone
}

func (s *Service) askShutdown(ctx context.Context, h vmm.Handle, sup *supervisor.Supervisor) (string, error) {
	if sup != nil {
		return sup.Shutdown(ctx)
	}
	dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	c, err := agentDial(h, agent.ClientOptions{})(dctx)
	cancel()
	if err != nil {
		return "", err
	}
	defer c.Close()
	return c.Shutdown(ctx)
}

var loopDevRE = regexp.MustCompile(`^/dev/loop[0-9]+$`)

// OwnRuntime returns rt without every resource that cannot be this VM's by
// its name alone, and a description of each one dropped:
//   - a runtime dir other than the VM's own, sockets outside it (or
//     outside the VM's own jail under the jailer's chroot base);
//   - a tap not named TapName(id), or with an alias other than TapAlias(id);
//   - loops whose backing file is not inside the VM's dir;
//   - a dm device other than DMNames(id);
//   - disk files outside the VM's dir;
//   - a monitor pid whose recorded command line does not name the VM's
//     runtime dir, or, under the jailer, carry --id=<id> (the process
//     itself is checked again, start time, boot id and command line,
//     before any signal).
//
// Cleanup passes the result on; netctl and blockdev verify the survivors
// once more against the kernel (alias, backing file, dm UUID).
func (s *Service) OwnRuntime(id string, rt model.Runtime) (model.Runtime, []string) {
	var refused []string
	rtDir, vmDir := s.RuntimeDir(id), s.VMDir(id)
	mon, dk := &rt.Monitor, &rt.Disk
	if rt.RuntimeDir != "" && filepath.Clean(rt.RuntimeDir) != rtDir {
		refused = append(refused, "runtime dir "+rt.RuntimeDir)
		rt.RuntimeDir = ""
	}
	jail := ""
	if mon.Jail != "" {
		// A jailed monitor's sockets are in its jail, which must be this
		// VM's under the configured chroot base.
		if j := s.cfg.Jailer(); j != nil {
			if inv, err := jailer.FromJailDir(j.ChrootBase, mon.Jail); err == nil && inv.ID == id {
				jail = inv.JailDir()
			}
		}
		if jail == "" {
			refused = append(refused, "jail "+mon.Jail)
			mon.Jail = ""
		}
	}
	for _, p := range []*string{&mon.APISocket, &mon.AgentSocket, &mon.ConsoleSocket, &mon.ConsoleFIFO} {
		if *p != "" && !subpath.Inside(rtDir, *p) && (jail == "" || !subpath.Inside(jail, *p)) {
			refused = append(refused, "socket "+*p)
			*p = ""
		}
	}
	if t := rt.Tap; t.Name != "" && (t.Name != netctl.TapName(id) || (t.Alias != "" && t.Alias != netctl.TapAlias(id))) {
		refused = append(refused, fmt.Sprintf("tap %q (alias %q)", t.Name, t.Alias))
		rt.Tap = netctl.TapRef{}
	}
	var loops []blockdev.Loop
	for _, l := range dk.Loops {
		if (l.Device != "" && !loopDevRE.MatchString(l.Device)) || !subpath.InsideResolved(vmDir, l.BackingFile) {
			refused = append(refused, fmt.Sprintf("loop %s backed by %q", l.Device, l.BackingFile))
			continue
		}
		loops = append(loops, l)
	}
	dk.Loops = loops
	dmName, dmUUID := blockdev.DMNames(id)
	if (dk.DMName != "" && dk.DMName != dmName) || (dk.DMUUID != "" && dk.DMUUID != dmUUID) {
		refused = append(refused, fmt.Sprintf("dm %q (uuid %q)", dk.DMName, dk.DMUUID))
		dk.DMName, dk.DMUUID = "", ""
	}
	for _, f := range []*string{&dk.COWPath, &dk.BaseLink} {
		if *f != "" && !subpath.InsideResolved(vmDir, *f) {
			refused = append(refused, "disk file "+*f)
			*f = ""
		}
	}
	if dk.Path != "" && !subpath.InsideResolved(vmDir, dk.Path) && dk.Path != "/dev/mapper/"+dmName {
		refused = append(refused, "disk "+dk.Path)
		dk.Path = ""
	}
	// A jailed Firecracker's command line names no host path: the jailer
	// execs it as /<name> --id=<vm id>, in the VM's own jail.
	jailed := jail != "" && len(mon.Cmdline) > 1 && mon.Cmdline[1] == "--id="+id
	if mon.PID != 0 && (mon.PID <= 1 || (!namesDir(mon.Cmdline, rtDir) && !jailed)) {
		refused = append(refused, fmt.Sprintf("pid %d (%s)", mon.PID, strings.Join(mon.Cmdline, " ")))
		mon.PID, mon.PIDStart, mon.BootID, mon.Cmdline = 0, 0, "", nil
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
