package netctl_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
)

func TestBridgeAndTapLifecycle(t *testing.T) {
	testutil.InNetNS(t)
	ctx := context.Background()
	cfg := netctl.Config{}
	for range 2 {
		if err := netctl.EnsureBridge(ctx, cfg); err != nil {
			t.Fatalf("EnsureBridge(default): %v", err)
		}
	}
	br, err := netlink.LinkByName("banger0")
	if err != nil {
		t.Fatalf("bridge banger0 missing after EnsureBridge: %v", err)
	}
	if br.Type() != "bridge" || br.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("banger0: type %q flags %v, want an up bridge", br.Type(), br.Attrs().Flags)
	}
	addrs, err := netlink.AddrList(br, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	if len(addrs) != 1 || addrs[0].IPNet.String() != "172.30.0.1/24" {
		t.Errorf("banger0 addresses = %v, want exactly 172.30.0.1/24", addrs)
	}

	const vm = "0123456789abcdef-vm"
	tap, err := netctl.CreateTap(ctx, cfg, vm)
	if err != nil {
		t.Fatalf("CreateTap(%q): %v", vm, err)
	}
	if tap.Name != netctl.TapName(vm) || len(tap.Name) > 15 || !strings.HasPrefix(tap.Name, "bgr-") {
		t.Errorf("tap name %q: want TapName(vm)=%q, <= 15 bytes, prefix bgr-", tap.Name, netctl.TapName(vm))
	}
	link, err := netlink.LinkByName(tap.Name)
	if err != nil {
		t.Fatalf("tap %s not in kernel: %v", tap.Name, err)
	}
	tt, ok := link.(*netlink.Tuntap)
	if !ok {
		t.Fatalf("link %s is a %T, want *netlink.Tuntap", tap.Name, link)
	}
	if tt.Mode != netlink.TUNTAP_MODE_TAP || tt.NonPersist || tt.Owner != 0 {
		t.Errorf("tap %s: mode %v nonpersist %v owner %d, want persistent tap owned by uid 0", tap.Name, tt.Mode, tt.NonPersist, tt.Owner)
	}
	if got := link.Attrs().Alias; got != "banger:"+vm {
		t.Errorf("tap alias = %q, want %q", got, "banger:"+vm)
	}
	if link.Attrs().MasterIndex != br.Attrs().Index || link.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("tap master %d up %v, want master %d (banger0) and up", link.Attrs().MasterIndex, link.Attrs().Flags&net.FlagUp != 0, br.Attrs().Index)
	}

	again, err := netctl.CreateTap(ctx, cfg, vm)
	if err != nil || again.Index != tap.Index {
		t.Errorf("second CreateTap = %+v, %v; want the same tap (index %d) reused", again, err, tap.Index)
	}
	taps, err := netctl.ListTaps(ctx)
	if err != nil || len(taps) != 1 || taps[0].VMID != vm || taps[0].Bridge != "banger0" || !taps[0].Up {
		t.Errorf("ListTaps = %+v, %v; want one up tap of %s on banger0", taps, err, vm)
	}

	for i := range 2 { // the second delete finds nothing: success
		if err := netctl.DeleteTap(ctx, tap.Name, vm); err != nil {
			t.Fatalf("DeleteTap #%d: %v", i+1, err)
		}
	}
	if _, err := netlink.LinkByName(tap.Name); err == nil {
		t.Errorf("tap %s still exists after DeleteTap", tap.Name)
	}
	if taps, err := netctl.ListTaps(ctx); err != nil || len(taps) != 0 {
		t.Errorf("ListTaps after delete = %+v, %v; want none", taps, err)
	}
}

func TestDeleteTapRefusesForeignLinks(t *testing.T) {
	testutil.InNetNS(t)
	ctx := context.Background()
	if err := netctl.EnsureBridge(ctx, netctl.Config{}); err != nil {
		t.Fatal(err)
	}
	const vm = "victim"
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "testveth0"}, PeerName: "testveth1"}); err != nil {
		t.Fatalf("create veth: %v", err)
	}
	// A link that has the VM's tap name but no alias (someone else's).
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: netctl.TapName(vm)}, PeerName: "testveth2"}); err != nil {
		t.Fatalf("create veth named like the tap: %v", err)
	}
	// Another VM's tap.
	other, err := netctl.CreateTap(ctx, netctl.Config{}, "other-vm")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"lo", "testveth0", "testveth1", netctl.TapName(vm), other.Name, "banger0"} {
		err := netctl.DeleteTap(ctx, name, vm)
		if !errors.Is(err, netctl.ErrNotOurs) {
			t.Errorf("DeleteTap(%q, %q) = %v, want ErrNotOurs", name, vm, err)
		}
		if _, err := netlink.LinkByName(name); err != nil {
			t.Errorf("%s did not survive DeleteTap: %v", name, err)
		}
	}
	if _, err := netctl.CreateTap(ctx, netctl.Config{}, vm); !errors.Is(err, netctl.ErrNameTaken) {
		t.Errorf("CreateTap over a foreign link = %v, want ErrNameTaken", err)
	}
	if l, err := netlink.LinkByName(netctl.TapName(vm)); err != nil || l.Type() != "veth" {
		t.Errorf("foreign veth after CreateTap: %v, %v; want it untouched", l, err)
	}
	if err := netctl.DeleteTap(ctx, "eth0/../x", vm); err == nil {
		t.Errorf("DeleteTap accepted an invalid interface name")
	}
}

func TestNATTable(t *testing.T) {
	testutil.InNetNS(t)
	testutil.RequiresTool(t, "nft")
	ctx := context.Background()
	cfg := netctl.Config{Subnet: netip.MustParsePrefix("172.30.0.0/24")}
	if err := netctl.EnsureBridge(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	for range 2 { // idempotent: the second call replaces, never duplicates
		if err := netctl.EnsureNAT(ctx, cfg, ""); err != nil {
			t.Fatalf("EnsureNAT: %v", err)
		}
	}
	st, err := netctl.InspectNAT(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(st.Chains)
	if !st.Present || strings.Join(st.Chains, ",") != "forward,postrouting" || len(st.Rules) != 3 {
		t.Fatalf("InspectNAT = %+v; want table with chains forward,postrouting and 3 rules", st)
	}
	var masq, fwdIn, fwdBack bool
	for _, r := range st.Rules {
		switch r.Chain {
		case "postrouting":
			var src bool
			for _, e := range r.Exprs {
				if c, ok := e.(*expr.Cmp); ok && net.IP(c.Data).Equal(net.IPv4(172, 30, 0, 0)) {
					src = true
				}
				if _, ok := e.(*expr.Masq); ok && src {
					masq = true
				}
			}
		case "forward":
			iif, oif, accept := false, false, false
			var meta *expr.Meta
			for _, e := range r.Exprs {
				switch e := e.(type) {
				case *expr.Meta:
					meta = e
				case *expr.Cmp:
					if meta != nil && e.Op == expr.CmpOpEq && netctl.IfName(e.Data) == "banger0" {
						iif = iif || meta.Key == expr.MetaKeyIIFNAME
						oif = oif || meta.Key == expr.MetaKeyOIFNAME
					}
					meta = nil
				case *expr.Verdict:
					accept = e.Kind == expr.VerdictAccept
				}
			}
			fwdIn = fwdIn || (iif && accept)
			fwdBack = fwdBack || (oif && accept)
		}
	}
	if !masq || !fwdIn || !fwdBack {
		t.Errorf("rules %+v: masquerade of 172.30.0.0/24 %v, forward from banger0 %v, return traffic to banger0 %v; want all", st.Rules, masq, fwdIn, fwdBack)
	}
	// Cross-check with the nft binary (run from this thread, so in this namespace).
	out, err := exec.CommandContext(ctx, "nft", "list", "table", "ip", "banger").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list table ip banger: %v\n%s", err, out)
	}
	for _, want := range []string{"ip saddr 172.30.0.0/24", `oifname != "banger0"`, "masquerade", `iifname "banger0"`, "ct state established,related", "hook postrouting priority srcnat", "hook forward priority filter"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("nft list table ip banger lacks %q:\n%s", want, out)
		}
	}
	for i := range 2 {
		if err := netctl.RemoveNAT(ctx); err != nil {
			t.Fatalf("RemoveNAT #%d: %v", i+1, err)
		}
	}
	if st, err := netctl.InspectNAT(ctx); err != nil || st.Present {
		t.Errorf("InspectNAT after RemoveNAT = %+v, %v; want absent", st, err)
	}
}

func TestIPForwardPerNamespace(t *testing.T) {
	hostBefore := hostIPForward(t)
	testutil.InNetNS(t)
	// A new namespace copies ip_forward from the host's (the kernel's
	// default net.core.devconf_inherit_init_net=0), so turn it off here
	// first: the test must not depend on what the host has set.
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("0\n"), 0o644); err != nil {
		t.Fatalf("turn ip_forward off in the test namespace: %v", err)
	}
	on, err := netctl.IPForwardEnabled()
	if err != nil || on {
		t.Fatalf("IPForwardEnabled after turning it off in the test namespace = %v, %v; want false", on, err)
	}
	if err := netctl.EnableIPForward(); err != nil {
		t.Fatal(err)
	}
	if on, err := netctl.IPForwardEnabled(); err != nil || !on {
		t.Errorf("IPForwardEnabled after EnableIPForward = %v, %v; want true", on, err)
	}
	if got := hostIPForward(t); got != hostBefore {
		t.Errorf("host ip_forward changed from %v to %v: EnableIPForward escaped the namespace", hostBefore, got)
	}
}

// hostIPForward reads ip_forward from a goroutine that is not locked to the
// test's namespaced thread, so it runs on a thread in the host namespace.
func hostIPForward(t *testing.T) bool {
	t.Helper()
	type res struct {
		on  bool
		err error
	}
	ch := make(chan res)
	go func() { on, err := netctl.IPForwardEnabled(); ch <- res{on, err} }()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.on
}

// BenchmarkTapCreate measures CreateTap (create, alias, attach, up) over
// 200 rounds per iteration and reports the median and p99.
func BenchmarkTapCreate(b *testing.B) {
	testutil.InNetNS(b)
	ctx := context.Background()
	if err := netctl.EnsureBridge(ctx, netctl.Config{}); err != nil {
		b.Fatal(err)
	}
	const rounds = 200
	var d []time.Duration
	for i := 0; b.Loop(); i++ {
		for r := range rounds {
			vm := "bench-" + strconv.Itoa(i) + "-" + strconv.Itoa(r)
			start := time.Now()
			tap, err := netctl.CreateTap(ctx, netctl.Config{}, vm)
			d = append(d, time.Since(start))
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if err := netctl.DeleteTap(ctx, tap.Name, vm); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	b.ReportMetric(float64(d[len(d)/2].Microseconds()), "median-µs")
	b.ReportMetric(float64(d[len(d)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(len(d)), "rounds")
}

// TestHasUplink: a namespace with no default route has no uplink; a
// default route through a dummy interface is one; a default route through
// the bridge is not.
func TestHasUplink(t *testing.T) {
	testutil.InNetNS(t)
	cfg := netctl.Config{}
	if up, err := netctl.HasUplink(cfg); err != nil || up {
		t.Fatalf("fresh namespace: HasUplink = %t, %v; want false", up, err)
	}
	if err := netctl.EnsureBridge(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	br, err := netlink.LinkByName("banger0")
	if err != nil {
		t.Fatal(err)
	}
	anyDst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	def := &netlink.Route{LinkIndex: br.Attrs().Index, Dst: anyDst, Scope: netlink.SCOPE_LINK}
	if err := netlink.RouteAdd(def); err != nil {
		t.Fatalf("default route on the bridge: %v", err)
	}
	if up, err := netctl.HasUplink(cfg); err != nil || up {
		t.Errorf("default route through the bridge: HasUplink = %t, %v; want false", up, err)
	}
	if err := netlink.RouteDel(def); err != nil {
		t.Fatal(err)
	}
	dummy := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0"}, PeerName: "up1"}
	if err := netlink.LinkAdd(dummy); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(dummy); err != nil {
		t.Fatal(err)
	}
	if err := netlink.RouteAdd(&netlink.Route{LinkIndex: dummy.Attrs().Index, Dst: anyDst, Scope: netlink.SCOPE_LINK}); err != nil {
		t.Fatalf("default route on up0: %v", err)
	}
	if up, err := netctl.HasUplink(cfg); err != nil || !up {
		t.Errorf("default route through up0: HasUplink = %t, %v; want true", up, err)
	}
}
