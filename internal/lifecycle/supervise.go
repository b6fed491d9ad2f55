package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/supervisor"
	"github.com/bangerdev/banger/internal/vmm"
)

// Supervise starts the supervisor of a started (or re-adopted) VM: the
// watcher of its monitor and, for a starting VM, the boot waiter. It
// replaces a supervisor the VM had.
func (s *Service) Supervise(vm model.VM) *supervisor.Supervisor {
	mon, err := s.Monitor(vm.VMM)
	if err != nil {
		// The VM was started with this monitor: it cannot be unknown.
		panic(fmt.Sprintf("VM %s runs under unknown monitor %q: %v", vm.ID, vm.VMM, err))
	}
	hooks := supervisor.Hooks{Exited: s.monitorExited}
	var opts agent.ClientOptions
	switch {
	case vm.State == model.VMStarting && vm.Runtime.Phase == PhaseIdentity:
		hooks.Boot = s.identityWait // restored from a snapshot (snapshot.go)
		opts.HelloRetry = restoredHelloRetry
	case vm.State == model.VMStarting:
		hooks.Boot = s.bootWait
	}
	sup := supervisor.Start(s.bg, vm, mon, vm.Runtime.Monitor, agentDial(vm.Runtime.Monitor, opts), hooks)
	s.sups.Put(vm.ID, sup)
	s.publish(vm, sup)
	s.attachMounts(vm, sup)
	return sup
}

// monitorExited releases a VM whose monitor process exited on its own
// (guest poweroff, crash, kill from outside).
func (s *Service) monitorExited(sup *supervisor.Supervisor) {
	vm := sup.VM()
	mu := s.Lock(vm.ID)
	mu.Lock()
	defer mu.Unlock()
	if sup.Stopping() {
		return
	}
	cur, err := s.store.GetVM(vm.ID)
	if err != nil || cur.Runtime.Monitor.PID != sup.Handle().PID {
		return
	}
	status, known := vmm.ExitStatus(sup.Handle(), 200*time.Millisecond)
	if !known {
		status = "its exit status is unknown: it was re-adopted after a daemon restart"
	}
	s.log.Info("VM monitor exited on its own; releasing the VM's resources", "vm", cur.Name, "pid", sup.Handle().PID, "status", status)
	m := Mark{State: model.VMStopped, Failed: func(err error) string {
		return "the VM monitor exited and cleanup failed: " + err.Error()
	}}
	if cur.State == model.VMStarting {
		why := ""
		if known {
			why = " (" + status + ")"
		}
		m.State, m.Reason = model.VMError, "the VM monitor exited while the guest was booting"+why+": see banger vm logs "+cur.Name
	}
	// Record the outcome before the supervisor ends: a caller waiting for
	// the boot sees the reason, not a canceled wait.
	_, _ = s.ReleaseAndMark(s.bg, cur, nil, m)
	s.sups.Remove(vm.ID, sup)
	sup.Close()
}

// bootWait is the boot waiter of a starting VM: it waits until the guest is
// ready for ssh and moves the VM to running, or to error (releasing its
// resources) when the healthy timeout passes.
func (s *Service) bootWait(ctx context.Context, sup *supervisor.Supervisor) error {
	vm := sup.VM()
	timeout := time.Duration(s.cfg.HealthyTimeout)
	if timeout <= 0 {
		timeout = 5 * time.Minute
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := s.waitGuest(wctx, vm, sup)
	if ctx.Err() != nil {
		return ctx.Err() // stopped or daemon shutting down: not our call
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
	reason := fmt.Sprintf("the guest did not become ready within %s: %v (console log: banger vm logs %s)", timeout, err, vm.Name)
	s.log.Warn("VM not ready; stopping it", "vm", vm.Name, "err", err)
	s.sups.Remove(vm.ID, sup)
	sup.Detach()
	out, _ := s.ReleaseAndMark(s.bg, cur, sup, Mark{State: model.VMError, Reason: reason, Failed: func(err error) string {
		return reason + "; cleanup: " + err.Error()
	}})
	sup.Close()
	if out.Reason != "" {
		reason = out.Reason
	}
	return errors.New(reason)
}

// waitGuest waits on the supervisor's agent session for the guest to be
// ready, recording the first-boot state as it goes, then records the VM as
// running with its host key.
func (s *Service) waitGuest(ctx context.Context, vm model.VM, sup *supervisor.Supervisor) error {
	st, err := sup.WaitBooted(ctx, supervisor.BootWait{
		SSHKey: vm.SSHKey, AgentOnly: s.cfg.ReadyCheck == "agent", IP: vm.IP, Poll: readyPoll,
		Trace: func(step string) {
			s.log.Debug("boot waiter: "+step, "vm", vm.Name, "since_monitor", time.Since(vm.StartedAt).Round(time.Millisecond))
		},
		Status: func(st *agent.Status) {
			_, _ = s.store.UpdateVM(vm.ID, func(v *model.VM) error {
				v.FirstBoot = string(st.FirstBoot)
				return nil
			})
		},
	})
	if err != nil {
		return err
	}
	_, err = s.store.UpdateVM(vm.ID, func(v *model.VM) error {
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
		s.log.Info("VM ready", "vm", vm.Name, "first_boot", st.FirstBoot, "since_monitor", time.Since(vm.StartedAt).Round(time.Millisecond))
	}
	return err
}

// waitReady waits for the boot waiter of sup, reporting progress.
func (s *Service) waitReady(ctx context.Context, vm model.VM, sup *supervisor.Supervisor, report progress.Func) (model.VM, error) {
	report.Report(progress.Event{Phase: "boot", Item: vm.Name, Message: "waiting for the guest agent and sshd"})
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	start := time.Now()
	for {
		select {
		case <-sup.Ready():
			cur, err := s.store.GetVM(vm.ID)
			if err != nil {
				return cur, err
			}
			if sup.ReadyErr() != nil || cur.State != model.VMRunning {
				msg := cur.Reason
				if msg == "" && sup.ReadyErr() != nil {
					msg = sup.ReadyErr().Error()
				}
				return cur, fmt.Errorf("VM %q did not become ready: %s", vm.Name, msg)
			}
			report.Report(progress.Event{Phase: "boot", Item: vm.Name, Done: true, Message: fmt.Sprintf("ready in %s", time.Since(start).Round(100*time.Millisecond))})
			return cur, nil
		case <-ctx.Done():
			return vm, api.Errorf(api.CodeCanceled, "stopped waiting for VM %q; it keeps booting (banger vm ls shows when it is running)", vm.Name)
		case <-t.C:
			cur, _ := s.store.GetVM(vm.ID)
			msg := "waiting for the guest agent"
			if cur.FirstBoot != "" {
				msg = "first boot: " + cur.FirstBoot
			}
			report.Report(progress.Event{Phase: "boot", Item: vm.Name, Message: msg + fmt.Sprintf(" (%s)", time.Since(start).Round(time.Second))})
		}
	}
}

// restoredHelloRetry caps the serial hello's repeat interval for a guest
// restored from a snapshot: its agent is running already and answers as
// soon as it has dropped the session it was saved with, so waiting for the
// next repeat of the boot-time schedule (up to 200 ms) is the longest part
// of its first session.
const restoredHelloRetry = 40 * time.Millisecond

// agentDial returns how to reach the agent of the VM monitor h: the
// connection vmm.AgentConn hands over, with the agent's hello on top; opts
// tune the client (its Resync comes from the transport).
func agentDial(h vmm.Handle, opts agent.ClientOptions) agent.DialFunc {
	return func(ctx context.Context) (*agent.Client, error) {
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, agent.DefaultDialTimeout)
			defer cancel()
		}
		conn, serial, err := vmm.AgentConn(ctx, h)
		if err != nil {
			return nil, err
		}
		opts.Resync = serial
		c, err := agent.NewClient(ctx, conn, opts)
		if err != nil {
			_ = conn.Close()
			return nil, fmt.Errorf("guest agent (%s): %w", h.AgentTransport, err)
		}
		return c, nil
	}
}
