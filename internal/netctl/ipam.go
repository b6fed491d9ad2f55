package netctl

import (
	"fmt"
	"net/netip"
)

// Leases hands out guest addresses from one subnet and remembers them across
// daemon restarts. The daemon's store implements it so that a lease is
// written in the same transaction as the VM record; leasetest.Run is the
// conformance suite every implementation must pass.
type Leases interface {
	// Allocate returns vmID's address, allocating a free one if the VM has
	// none. Calling it again for the same VM returns the same address.
	// Concurrent calls never return the same address for two VMs.
	// It fails with ErrSubnetFull when no address is left.
	Allocate(vmID string) (netip.Addr, error)
	// Release frees vmID's address. Releasing a VM without a lease is not
	// an error.
	Release(vmID string) error
}

// NextFreeIP returns the lowest address of subnet that is not in used,
// skipping the network address, the gateway (first host address) and the
// broadcast address. It returns ErrSubnetFull when none is left. It is the
// allocation rule Leases implementations share.
func NextFreeIP(subnet netip.Prefix, used map[netip.Addr]bool) (netip.Addr, error) {
	subnet = subnet.Masked()
	if !subnet.Addr().Is4() || subnet.Bits() > 30 {
		return netip.Addr{}, fmt.Errorf("allocate address in %s: need an IPv4 subnet of /30 or larger", subnet)
	}
	broadcast := lastAddr(subnet)
	for a := Gateway(subnet).Next(); a.IsValid() && a.Less(broadcast); a = a.Next() {
		if !used[a] {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("allocate address in %s: %w", subnet, ErrSubnetFull)
}

// GuestAddr reports whether a is an address NextFreeIP could hand out in
// subnet: inside it, and neither the network, gateway nor broadcast address.
func GuestAddr(subnet netip.Prefix, a netip.Addr) bool {
	subnet = subnet.Masked()
	return subnet.Contains(a) && a != subnet.Addr() && a != Gateway(subnet) && a != lastAddr(subnet)
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := 32 - p.Bits()
	for i := 3; i >= 0 && host > 0; i-- {
		n := min(host, 8)
		b[i] |= byte(1<<n - 1)
		host -= n
	}
	return netip.AddrFrom4(b)
}
