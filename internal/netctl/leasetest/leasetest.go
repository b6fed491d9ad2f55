// Package leasetest is the conformance suite for netctl.Leases
// implementations. The daemon's store runs it against its own
// implementation; netctl runs it against a reference one backed by bbolt.
package leasetest

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/netctl"
)

// Opener opens the lease store kept in dir, handing out addresses from
// subnet, and returns it with a function that closes it. Run calls it more
// than once with the same dir to simulate a daemon restart, closing the
// previous store first.
type Opener func(t *testing.T, dir string, subnet netip.Prefix) (netctl.Leases, func() error)

// Parallel is how many allocations Run makes at once.
const Parallel = 100

// Run checks that l:
//   - gives Parallel concurrent allocations distinct guest addresses of the subnet;
//   - returns the same address when a VM allocates again;
//   - keeps every lease across a close and reopen (restart), and gives new
//     VMs addresses nobody holds;
//   - reuses a released address, and treats releasing an unknown VM as success;
//   - reports netctl.ErrSubnetFull when the subnet is exhausted.
func Run(t *testing.T, open Opener) {
	t.Helper()
	t.Run("ConcurrentAndRestart", func(t *testing.T) { concurrentAndRestart(t, open) })
	t.Run("ReleaseAndFull", func(t *testing.T) { releaseAndFull(t, open) })
}

func allocateAll(t *testing.T, l netctl.Leases, ids []string) map[string]netip.Addr {
	t.Helper()
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		got  = map[string]netip.Addr{}
		errs []error
	)
	for _, id := range ids {
		wg.Go(func() {
			a, err := l.Allocate(id)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("Allocate(%q): %w", id, err))
				return
			}
			got[id] = a
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return got
}

func checkDistinct(t *testing.T, subnet netip.Prefix, leases ...map[string]netip.Addr) {
	t.Helper()
	owner := map[netip.Addr]string{}
	for _, m := range leases {
		for id, a := range m {
			if !netctl.GuestAddr(subnet, a) {
				t.Errorf("VM %s got %s: not a guest address of %s (network, gateway and broadcast are reserved)", id, a, subnet)
			}
			if prev, dup := owner[a]; dup && prev != id {
				t.Errorf("address %s given to both %s and %s", a, prev, id)
			}
			owner[a] = id
		}
	}
}

func ids(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%03d", prefix, i)
	}
	return out
}

func concurrentAndRestart(t *testing.T, open Opener) {
	subnet := netip.MustParsePrefix("10.77.0.0/24")
	dir := t.TempDir()
	l, closeFn := open(t, dir, subnet)
	first := allocateAll(t, l, ids("a", Parallel))
	if len(first) != Parallel {
		t.Fatalf("%d of %d allocations returned", len(first), Parallel)
	}
	checkDistinct(t, subnet, first)
	// Allocating again for the same VMs, concurrently, returns their leases.
	again := allocateAll(t, l, ids("a", Parallel))
	for id, a := range first {
		if again[id] != a {
			t.Errorf("second Allocate(%q) = %s, want its lease %s", id, again[id], a)
		}
	}
	if err := closeFn(); err != nil {
		t.Fatalf("close lease store: %v", err)
	}

	l, closeFn = open(t, dir, subnet) // restart
	defer func() {
		if err := closeFn(); err != nil {
			t.Errorf("close lease store: %v", err)
		}
	}()
	second := allocateAll(t, l, ids("b", Parallel))
	checkDistinct(t, subnet, first, second)
	kept := allocateAll(t, l, ids("a", 10))
	for id, a := range kept {
		if first[id] != a {
			t.Errorf("after restart Allocate(%q) = %s, want its lease %s", id, a, first[id])
		}
	}
}

func releaseAndFull(t *testing.T, open Opener) {
	subnet := netip.MustParsePrefix("192.168.50.0/29") // 8 addresses, 5 for guests
	l, closeFn := open(t, t.TempDir(), subnet)
	defer func() {
		if err := closeFn(); err != nil {
			t.Errorf("close lease store: %v", err)
		}
	}()
	got := allocateAll(t, l, ids("vm", 5))
	checkDistinct(t, subnet, got)
	if a, err := l.Allocate("one-too-many"); !errors.Is(err, netctl.ErrSubnetFull) {
		t.Fatalf("Allocate in a full %s = %s, %v; want ErrSubnetFull", subnet, a, err)
	}
	freed := got["vm-002"]
	if err := l.Release("vm-002"); err != nil {
		t.Fatalf("Release(vm-002): %v", err)
	}
	if err := l.Release("vm-002"); err != nil {
		t.Errorf("second Release(vm-002) = %v, want nil", err)
	}
	if err := l.Release("never-allocated"); err != nil {
		t.Errorf("Release(never-allocated) = %v, want nil", err)
	}
	a, err := l.Allocate("newcomer")
	if err != nil || a != freed {
		t.Errorf("Allocate after Release = %s, %v; want the freed %s", a, err, freed)
	}
}
