package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/portfwd"
	"github.com/bangerdev/banger/internal/supervisor"
)

// published holds the open port sets of running VMs, by VM id.
type published struct {
	mu   sync.Mutex
	sets map[string]*portfwd.Set
}

// portSpecs parses a create's -p values and checks them for the caller
// uid: privileged ports and non-loopback addresses are root's, and every
// host port must be free now. A port 0 gets its free port here, so the
// record names the port the VM keeps across starts and daemon restarts.
func portSpecs(values []string, uid uint32) ([]portfwd.Spec, error) {
	var specs []portfwd.Spec
	for _, v := range values {
		sp, err := portfwd.ParseSpecs(v)
		if err != nil {
			return nil, api.Errorf(api.CodeInvalid, "-p: %v", err)
		}
		specs = append(specs, sp...)
	}
	if err := portfwd.CheckDistinct(specs); err != nil {
		return nil, api.Errorf(api.CodeInvalid, "-p: %v", err)
	}
	for _, sp := range specs {
		if sp.NeedsRoot() && uid != 0 {
			return nil, api.Errorf(api.CodeForbidden, "-p %s: publishing a port below 1024 or on an address other than loopback needs root", sp)
		}
	}
	// Bind them all at once (so two port-0 specs get different ports),
	// note the ports, and release them for the start.
	var ls []*portfwd.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	for i, sp := range specs {
		l, err := portfwd.Listen(sp, portfwd.Options{})
		if err != nil {
			if errors.Is(err, portfwd.ErrPortInUse) {
				return nil, api.Errorf(api.CodeConflict, "-p: %v", err)
			}
			return nil, api.Errorf(api.CodeInvalid, "-p: %v", err)
		}
		ls = append(ls, l)
		specs[i] = l.Spec()
	}
	return specs, nil
}

// sessionStreams opens port-forward streams on a VM's shared agent
// session.
type sessionStreams struct{ sup *supervisor.Supervisor }

func (a sessionStreams) OpenService(ctx context.Context, service string) (net.Conn, error) {
	c, err := a.sup.Session(ctx)
	if err != nil {
		return nil, err
	}
	st, err := c.OpenService(ctx, service)
	if err != nil && !errors.Is(err, agent.ErrUnknownOp) && !errors.Is(err, agent.ErrAgentTooOld) {
		a.sup.DropSession(c)
	}
	return st, err
}

// publish opens vm's published ports on its supervisor's agent session. A
// connection that arrives before the guest is up is reset. A port taken
// since create is logged and recorded in the VM's reason; the VM runs.
func (s *Service) publish(vm model.VM, sup *supervisor.Supervisor) {
	s.unpublish(vm.ID)
	if len(vm.Ports) == 0 {
		return
	}
	set, err := portfwd.Publish(s.bg, vm.Ports, sessionStreams{sup}, portfwd.Options{Log: s.log.With("vm", vm.Name)})
	if err != nil {
		s.log.Error("publish ports", "vm", vm.Name, "err", err)
		_, _ = s.store.UpdateVM(vm.ID, func(v *model.VM) error {
			v.Reason = fmt.Sprintf("published ports not open: %v", err)
			return nil
		})
		return
	}
	s.pub.mu.Lock()
	defer s.pub.mu.Unlock()
	if s.pub.sets == nil {
		s.pub.sets = map[string]*portfwd.Set{}
	}
	s.pub.sets[vm.ID] = set
	s.log.Info("ports published", "vm", vm.Name, "ports", fmt.Sprint(set.Specs()))
}

// unpublish closes a VM's published ports and the connections on them.
func (s *Service) unpublish(id string) {
	s.pub.mu.Lock()
	set := s.pub.sets[id]
	delete(s.pub.sets, id)
	s.pub.mu.Unlock()
	if set != nil {
		_ = set.Close()
	}
}
