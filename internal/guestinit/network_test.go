package guestinit

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/testutil"
)

// TestConfigureNetwork runs PID 1's netlink setup (also the network mode
// of systemd images) in a test network namespace on a veth Ethernet
// interface: chosen by MAC, addressed, a default route via the gateway,
// idempotent, and a clear error when the interface never comes.
func TestConfigureNetwork(t *testing.T) {
	testutil.InNetNS(t)
	mac := net.HardwareAddr{0x52, 0x54, 0, 0xaa, 0xbb, 0xcc}
	for _, l := range []netlink.Link{
		&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "other0", HardwareAddr: net.HardwareAddr{0x52, 0x54, 0, 1, 1, 1}}, PeerName: "otherpeer0"},
		&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth7", HardwareAddr: mac}, PeerName: "peer7"},
	} {
		if err := netlink.LinkAdd(l); err != nil {
			t.Fatalf("add %s: %v", l.Attrs().Name, err)
		}
	}
	n := guestabi.Network{Address: netip.MustParsePrefix("10.77.0.5/24"), Gateway: netip.MustParseAddr("10.77.0.1"), MAC: mac}
	for i := 0; i < 2; i++ { // the second run replaces, not fails
		iface, err := configureNetwork(n, time.Second)
		if err != nil || iface != "eth7" {
			t.Fatalf("configureNetwork #%d = %q, %v; want eth7", i+1, iface, err)
		}
	}
	link, err := netlink.LinkByName("eth7")
	if err != nil {
		t.Fatal(err)
	}
	addrs, _ := netlink.AddrList(link, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "10.77.0.5/24" {
		t.Errorf("eth7 addresses %v, want 10.77.0.5/24", addrs)
	}
	routes, _ := netlink.RouteList(link, netlink.FAMILY_V4)
	def := false
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.String() == "10.77.0.1" {
			def = true
		}
	}
	if !def {
		t.Errorf("no default route via 10.77.0.1 on eth7: %v", routes)
	}
	if other, _ := netlink.LinkByName("other0"); other != nil {
		if a, _ := netlink.AddrList(other, netlink.FAMILY_V4); len(a) != 0 {
			t.Errorf("the interface with another MAC got %v", a)
		}
	}
	n.MAC = net.HardwareAddr{2, 0, 0, 0, 0, 9}
	if _, err := configureNetwork(n, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "no interface with MAC 02:00:00:00:00:09") {
		t.Errorf("missing MAC: %v", err)
	}
}
