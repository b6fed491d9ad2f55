package lifecycle

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/quota"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/qemu"
)

// contain fills in what keeps a VM monitor within bounds: the console log
// cap and, for QEMU run by a root daemon, the unprivileged user it runs as
// (config vmm_user, created when missing). Firecracker's containment is its
// jailer (config firecracker_jailer): RunAs is then the jail's uid and gid.
func (s *Service) contain(spec *vmm.Spec, monitor string) error {
	max, err := s.cfg.ConsoleLogBytes()
	if err != nil {
		return api.Errorf(api.CodeInvalid, "%v", err)
	}
	spec.ConsoleLogMax = max
	if monitor == firecracker.Name {
		cred, err := s.jailCredential(spec.VsockCID)
		if err != nil {
			return api.Errorf(api.CodeInvalid, "%v", err)
		}
		spec.RunAs = cred
		return nil
	}
	if monitor != qemu.Name || s.cfg.VMMUser == "" || os.Geteuid() != 0 {
		return nil
	}
	cred, err := vmm.EnsureUser(s.cfg.VMMUser)
	if err != nil {
		return api.Errorf(api.CodeUnavailable, "%v", err)
	}
	spec.RunAs = cred
	return nil
}

// jailCredential is the uid and gid a jailed Firecracker of the VM with
// vsock CID cid runs as (nil without a jailer): the jailer's, or with its
// id_range one of the range per VM, by the index of the VM's address in
// the subnet (the CID is 1000 + that index: see vsockCID).
func (s *Service) jailCredential(cid uint32) (*vmm.Credential, error) {
	j := s.cfg.Jailer()
	if j == nil {
		return nil, nil
	}
	var n uint32
	if j.IDRange > 0 {
		if cid < 1000 {
			return nil, fmt.Errorf("jailer id_range: the VM has no address to derive its uid from")
		}
		n = cid - 1000
	}
	uid, gid, err := j.IDsFor(n)
	if err != nil {
		return nil, err
	}
	return &vmm.Credential{UID: uid, GID: gid}, nil
}

// quotaMu makes a quota check and the record it allows one step, so that
// two creates of one user cannot both pass the last free slot.
var quotaMu sync.Mutex

// withinQuota checks a new VM against the per-VM bounds and its owner's
// per-user limits (config "limits"), then runs create (which records the
// VM) under the same lock.
func (s *Service) withinQuota(vm model.VM, create func() error) error {
	l, err := s.cfg.Quota()
	if err != nil {
		return api.Errorf(api.CodeInvalid, "%v", err)
	}
	mem := int64(vm.MemoryMiB) << 20
	if err := l.CheckVM(vm.CPUs, mem, vm.DiskBytes); err != nil {
		return api.Errorf(api.CodeInvalid, "%v", err)
	}
	quotaMu.Lock()
	defer quotaMu.Unlock()
	owner := vm.OwnerUID
	vms, err := s.store.ListVMs(&owner)
	if err != nil {
		return err
	}
	var used quota.Usage
	for _, v := range vms {
		used.Add(v.CPUs, int64(v.MemoryMiB)<<20, v.DiskBytes)
	}
	if err := l.CheckUser(owner, used, vm.CPUs, mem, vm.DiskBytes); err != nil {
		if errors.Is(err, quota.ErrOverLimit) {
			return api.Errorf(api.CodeForbidden, "%v", err)
		}
		return err
	}
	return create()
}
