package store

import (
	"errors"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/netctl/leasetest"
)

// vmLeases is netctl.Leases on the store: a lease is a VM record's IP,
// allocated in the record's own transaction.
type vmLeases struct {
	s      *Store
	subnet netip.Prefix
}

func (l vmLeases) Allocate(vmID string) (netip.Addr, error) {
	if vm, err := l.s.GetVM(vmID); err == nil {
		return netip.ParseAddr(vm.IP)
	}
	vm := &model.VM{ID: vmID, Name: vmID}
	if err := l.s.CreateVM(vm, l.subnet); err != nil {
		return netip.Addr{}, err
	}
	return netip.ParseAddr(vm.IP)
}

func (l vmLeases) Release(vmID string) error {
	if err := l.s.DeleteVM(vmID); err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	return nil
}

// TestLeasesConformance runs netctl's lease suite against the store.
func TestLeasesConformance(t *testing.T) {
	leasetest.Run(t, func(t *testing.T, dir string, subnet netip.Prefix) (netctl.Leases, func() error) {
		s, err := Open(filepath.Join(dir, "banger.db"), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return vmLeases{s: s, subnet: subnet}, s.Close
	})
}
