// Package quota bounds what one VM may ask for and what one user may hold,
// so that no local user of the shared daemon can take the host's CPUs,
// memory or disk from the others.
//
// Limits come from the config file ("limits"). Per-VM bounds always apply;
// per-user totals apply to every caller but root, and 0 means no limit. A
// request over a limit is refused with an error that names the limit, its
// value, and what the user already holds.
package quota

import (
	"errors"
	"fmt"

	"github.com/bangerdev/banger/internal/units"
)

// ErrOverLimit marks a request refused by a limit. Test with errors.Is; the
// daemon answers it as "forbidden".
var ErrOverLimit = errors.New("over limit")

// ErrOutOfBounds marks a per-VM size outside its bounds; the daemon answers
// it as "invalid input".
var ErrOutOfBounds = errors.New("out of bounds")

// Limits are the configured bounds. Sizes are in bytes.
type Limits struct {
	// Per VM (always applied).
	VMCPUs   int   // most vCPUs one VM may have
	VMMemory int64 // most memory one VM may have
	VMDisk   int64 // largest disk one VM may have
	// Per user, over all of the user's VMs (0: no limit; root is exempt).
	VMs    int
	CPUs   int
	Memory int64
	Disk   int64
}

// Default per-VM bounds.
const (
	DefaultVMCPUs   = 64
	DefaultVMMemory = 256 << 30
	DefaultVMDisk   = 2 << 40
	MinVMMemory     = 128 << 20
)

// Usage is what a user holds: the sum over their VMs, whatever their state
// (a stopped VM keeps its disk, and may be started at any time).
type Usage struct {
	VMs    int
	CPUs   int
	Memory int64
	Disk   int64
}

// Add adds one VM's sizes to u.
func (u *Usage) Add(cpus int, memory, disk int64) {
	u.VMs++
	u.CPUs += cpus
	u.Memory += memory
	u.Disk += disk
}

// withDefaults fills unset per-VM bounds.
func (l Limits) withDefaults() Limits {
	if l.VMCPUs <= 0 {
		l.VMCPUs = DefaultVMCPUs
	}
	if l.VMMemory <= 0 {
		l.VMMemory = DefaultVMMemory
	}
	if l.VMDisk <= 0 {
		l.VMDisk = DefaultVMDisk
	}
	return l
}

// CheckVM checks one VM's sizes against the per-VM bounds.
func (l Limits) CheckVM(cpus int, memory, disk int64) error {
	l = l.withDefaults()
	switch {
	case cpus < 1 || cpus > l.VMCPUs:
		return fmt.Errorf("--cpus %d: use 1 to %d (limits.vm_cpus): %w", cpus, l.VMCPUs, ErrOutOfBounds)
	case memory < MinVMMemory || memory > l.VMMemory:
		return fmt.Errorf("--memory %s: use %s to %s (limits.vm_memory): %w",
			units.HumanBytes(memory), units.HumanBytes(MinVMMemory), units.HumanBytes(l.VMMemory), ErrOutOfBounds)
	case disk > l.VMDisk:
		return fmt.Errorf("--disk %s: at most %s (limits.vm_disk): %w", units.HumanBytes(disk), units.HumanBytes(l.VMDisk), ErrOutOfBounds)
	}
	return nil
}

// CheckUser checks that a user holding used may add one VM of the given
// sizes. root (uid 0) is not limited.
func (l Limits) CheckUser(uid uint32, used Usage, cpus int, memory, disk int64) error {
	if uid == 0 {
		return nil
	}
	over := func(limit, have, want, max string) error {
		return fmt.Errorf("per-user limit %s is %s: uid %d has %s and asks for %s more; remove a VM (banger vm rm) or ask the administrator to raise limits.%s: %w",
			limit, max, uid, have, want, limit, ErrOverLimit)
	}
	switch {
	case l.VMs > 0 && used.VMs+1 > l.VMs:
		return over("vms", fmt.Sprintf("%d VMs", used.VMs), "1", fmt.Sprint(l.VMs))
	case l.CPUs > 0 && used.CPUs+cpus > l.CPUs:
		return over("cpus", fmt.Sprintf("%d vCPUs", used.CPUs), fmt.Sprint(cpus), fmt.Sprint(l.CPUs))
	case l.Memory > 0 && used.Memory+memory > l.Memory:
		return over("memory", units.HumanBytes(used.Memory), units.HumanBytes(memory), units.HumanBytes(l.Memory))
	case l.Disk > 0 && used.Disk+disk > l.Disk:
		return over("disk", units.HumanBytes(used.Disk), units.HumanBytes(disk), units.HumanBytes(l.Disk))
	}
	return nil
}
