package netctl_test

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/netctl/leasetest"
)

func TestLeasesConformanceBolt(t *testing.T) {
	leasetest.Run(t, func(t *testing.T, dir string, subnet netip.Prefix) (netctl.Leases, func() error) {
		l, err := netctl.OpenBoltLeases(dir, subnet)
		if err != nil {
			t.Fatal(err)
		}
		return l, l.Close
	})
}

func TestNextFreeIP(t *testing.T) {
	p := netip.MustParsePrefix
	a := netip.MustParseAddr
	tests := []struct {
		subnet netip.Prefix
		used   []string
		want   string // "" = ErrSubnetFull
	}{
		{p("172.30.0.0/24"), nil, "172.30.0.2"},
		{p("172.30.0.77/24"), nil, "172.30.0.2"}, // unmasked prefix
		{p("172.30.0.0/24"), []string{"172.30.0.2", "172.30.0.3"}, "172.30.0.4"},
		{p("172.30.0.0/24"), []string{"172.30.0.3"}, "172.30.0.2"},
		{p("10.0.0.0/30"), nil, "10.0.0.2"},
		{p("10.0.0.0/30"), []string{"10.0.0.2"}, ""},
		{p("10.0.0.0/23"), nil, "10.0.0.2"},
	}
	for _, tc := range tests {
		used := map[netip.Addr]bool{}
		for _, u := range tc.used {
			used[a(u)] = true
		}
		got, err := netctl.NextFreeIP(tc.subnet, used)
		if tc.want == "" {
			if !errors.Is(err, netctl.ErrSubnetFull) {
				t.Errorf("NextFreeIP(%s, %v) = %s, %v; want ErrSubnetFull", tc.subnet, tc.used, got, err)
			}
			continue
		}
		if err != nil || got != a(tc.want) {
			t.Errorf("NextFreeIP(%s, %v) = %s, %v; want %s", tc.subnet, tc.used, got, err, tc.want)
		}
	}
	// A /24 has 253 guest addresses: .2 to .254; .255 is never handed out.
	used := map[netip.Addr]bool{}
	for range 253 {
		ip, err := netctl.NextFreeIP(p("172.30.0.0/24"), used)
		if err != nil {
			t.Fatalf("after %d allocations: %v", len(used), err)
		}
		used[ip] = true
	}
	if used[a("172.30.0.255")] || used[a("172.30.0.1")] || used[a("172.30.0.0")] {
		t.Errorf("reserved address handed out: %v", used)
	}
	if _, err := netctl.NextFreeIP(p("172.30.0.0/24"), used); !errors.Is(err, netctl.ErrSubnetFull) {
		t.Errorf("254th allocation: %v, want ErrSubnetFull", err)
	}
	if _, err := netctl.NextFreeIP(p("fd00::/64"), nil); err == nil {
		t.Errorf("NextFreeIP accepted an IPv6 subnet")
	}
}

func TestNamesAndMAC(t *testing.T) {
	seen := map[string]bool{}
	for _, id := range []string{"a", "01JC7ZQ5X3N0000000000000", "01JC7ZQ5X3N0000000000001", "0123456789abcdef0123456789abcdef"} {
		name := netctl.TapName(id)
		if len(name) != 15 || name[:4] != "bgr-" || seen[name] {
			t.Errorf("TapName(%q) = %q: want 15 bytes, prefix bgr-, unique", id, name)
		}
		seen[name] = true
		mac := netctl.MACFor(id)
		if len(mac) != 6 || mac[0]&0x02 == 0 || mac[0]&0x01 != 0 {
			t.Errorf("MACFor(%q) = %s: want 6 bytes, locally administered, unicast", id, mac)
		}
		if again := netctl.MACFor(id); again.String() != mac.String() {
			t.Errorf("MACFor(%q) not deterministic: %s then %s", id, mac, again)
		}
	}
	for _, bad := range []string{"", "-x", "a b", "a/b", "a:b", "x\x00", string(make([]byte, 65))} {
		if err := netctl.ValidateVMID(bad); !errors.Is(err, netctl.ErrInvalidVMID) {
			t.Errorf("ValidateVMID(%q) = %v, want ErrInvalidVMID", bad, err)
		}
	}
}
