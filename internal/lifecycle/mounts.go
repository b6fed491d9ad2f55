package lifecycle

import (
	"context"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/mounts"
	"github.com/bangerdev/banger/internal/supervisor"
)

// attached holds the mounted host folders of running VMs, by VM id.
type attached struct {
	mu   sync.Mutex
	sets map[string]*mounts.Set
}

// callerOf is the identity a VM owner's mount servers run as: the uid,
// its primary gid and supplementary groups from the user database.
func callerOf(uid uint32) (mounts.Caller, error) {
	u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
	if err != nil {
		return mounts.Caller{}, fmt.Errorf("look up uid %d: %w", uid, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return mounts.Caller{}, fmt.Errorf("uid %d: primary group %q: %w", uid, u.Gid, err)
	}
	c := mounts.Caller{UID: uid, GID: uint32(gid)}
	gids, _ := u.GroupIds()
	for _, g := range gids {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil {
			c.Groups = append(c.Groups, uint32(n))
		}
	}
	return c, nil
}

// launcher starts mount servers from the daemon's own executable.
func launcher() (mounts.Launcher, error) {
	exe, err := os.Executable()
	if err != nil {
		return mounts.Launcher{}, err
	}
	return mounts.Launcher{Command: []string{exe, "mount-server"}}, nil
}

// mountSpecs parses a create's --mount values and checks, as the caller
// uid, that it may read each folder (and write it unless :ro).
func mountSpecs(ctx context.Context, values []string, uid uint32) ([]mounts.Spec, error) {
	if len(values) == 0 {
		return nil, nil
	}
	var specs []mounts.Spec
	for _, v := range values {
		sp, err := mounts.ParseSpec(v)
		if err != nil {
			return nil, api.Errorf(api.CodeInvalid, "--mount: %v", err)
		}
		specs = append(specs, sp)
	}
	if err := mounts.CheckDistinct(specs); err != nil {
		return nil, api.Errorf(api.CodeInvalid, "--mount: %v", err)
	}
	// The guest folders ride on the kernel command line so the guest
	// mounts them at boot: refuse now what would not fit.
	probe := guestabi.Cmdline{Mounts: bootMounts(specs)}
	if s, err := probe.Encode(); err != nil || len(s) > maxMountsCmdline {
		return nil, api.Errorf(api.CodeInvalid, "--mount: the guest folders are too many or too long for the kernel command line (%d bytes encoded, at most %d): use fewer or shorter guest paths", len(s), maxMountsCmdline)
	}
	caller, err := callerOf(uid)
	if err != nil {
		return nil, api.Errorf(api.CodeForbidden, "--mount: %v", err)
	}
	l, err := launcher()
	if err != nil {
		return nil, err
	}
	if err := mounts.CheckAll(ctx, l, caller, specs); err != nil {
		return nil, api.Errorf(api.CodeForbidden, "--mount: %v", err)
	}
	return specs, nil
}

// maxMountsCmdline is the part of the kernel command line the guest
// folders may take (banger.mounts=).
const maxMountsCmdline = 768

// bootMounts are the guest folders of specs, which the guest mounts at
// boot (guestabi.Cmdline.Mounts) and the host serves once the agent is up.
func bootMounts(specs []mounts.Spec) []guestabi.BootMount {
	var out []guestabi.BootMount
	for _, s := range specs {
		out = append(out, guestabi.BootMount{Dir: s.GuestDir, ReadOnly: s.ReadOnly})
	}
	return out
}

// attachMounts mounts vm's folders in the guest once it is ready, each
// served by a server running as the VM's owner. A failure is logged and
// put in the VM's reason; the VM runs.
func (s *Service) attachMounts(vm model.VM, sup *supervisor.Supervisor) {
	s.detachMounts(vm.ID)
	if len(vm.Mounts) == 0 {
		return
	}
	go func() {
		<-sup.Ready()
		if sup.ReadyErr() != nil || sup.Stopping() {
			return
		}
		fail := func(err error) {
			s.log.Error("mount host folders", "vm", vm.Name, "err", err)
			_, _ = s.store.UpdateVM(vm.ID, func(v *model.VM) error {
				v.Reason = fmt.Sprintf("host folders not mounted: %v", err)
				return nil
			})
		}
		caller, err := callerOf(vm.OwnerUID)
		if err != nil {
			fail(err)
			return
		}
		l, err := launcher()
		if err != nil {
			fail(err)
			return
		}
		logw, err := os.OpenFile(filepath.Join(s.RuntimeDir(vm.ID), "mounts.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			fail(err)
			return
		}
		defer logw.Close()
		set, err := mounts.Attach(s.bg, sessionStreams{sup}, l, caller, vm.Mounts, logw)
		if err != nil {
			fail(err)
			return
		}
		s.mnt.mu.Lock()
		defer s.mnt.mu.Unlock()
		if s.sups.Get(vm.ID) != sup || sup.Stopping() {
			_ = set.Close() // released meanwhile
			return
		}
		if s.mnt.sets == nil {
			s.mnt.sets = map[string]*mounts.Set{}
		}
		s.mnt.sets[vm.ID] = set
		s.log.Info("host folders mounted", "vm", vm.Name, "mounts", fmt.Sprint(set.Specs()))
	}()
}

// detachMounts stops a VM's mount servers; the guest unmounts each folder.
func (s *Service) detachMounts(id string) {
	s.mnt.mu.Lock()
	set := s.mnt.sets[id]
	delete(s.mnt.sets, id)
	s.mnt.mu.Unlock()
	if set != nil {
		_ = set.Close()
	}
}
