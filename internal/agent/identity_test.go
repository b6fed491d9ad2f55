package agent

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/testutil"
)

// recordingSystem stands in for the running guest in the protocol test.
type recordingSystem struct {
	mu    sync.Mutex // the network step runs beside the file steps
	calls []string
	clock time.Time
	seed  []byte
	fail  string
}

func (r *recordingSystem) do(name string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, name)
	if r.fail == name {
		return errors.New(name + " failed (test)")
	}
	return nil
}
func (r *recordingSystem) setClock(t time.Time) error { r.clock = t; return r.do("clock") }
func (r *recordingSystem) reseed(s []byte) error      { r.seed = s; return r.do("reseed") }
func (r *recordingSystem) setNetwork(_, _ net.HardwareAddr, _ netip.Prefix, _ netip.Addr) error {
	return r.do("network")
}
func (r *recordingSystem) setHostname(string) error { return r.do("hostname") }
func (r *recordingSystem) reloadSSHD() error        { return r.do("sshd") }

func useSystem(t *testing.T, s identitySys) {
	old := identitySystem
	identitySystem = s
	t.Cleanup(func() { identitySystem = old })
}

func writeIdentityFile(t *testing.T, root, rel, content string) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestSetIdentity(t *testing.T) {
	sys := &recordingSystem{}
	useSystem(t, sys)
	s := newTestServer(t)
	root := s.Root
	writeIdentityFile(t, root, "/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tsaved-vm\n")
	writeIdentityFile(t, root, "/etc/hostname", "saved-vm\n")
	writeIdentityFile(t, root, "/etc/machine-id", "0123456789abcdef0123456789abcdef\n")
	writeIdentityFile(t, root, "/var/lib/dbus/machine-id", "0123456789abcdef0123456789abcdef\n")
	writeIdentityFile(t, root, "/etc/ssh/ssh_host_ed25519_key", "old private\n")
	writeIdentityFile(t, root, guestabi.HostKey, testKey(t, "old")+"\n")
	writeIdentityFile(t, root, "/etc/ssh/ssh_host_rsa_key", "old rsa\n")
	host, _ := servePipe(t, s, false)
	c, err := NewClient(context.Background(), host, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	now := time.Now()
	id := Identity{
		HostTime: now.UnixNano(), Seed: []byte("0123456789abcdef0123456789abcdef"),
		OldMAC: "06:00:0a:00:00:02", MAC: "06:00:0a:00:00:09", Address: "10.0.0.9/24", Gateway: "10.0.0.1",
		Hostname: "clone-1", MachineID: NewMachineID(), NewHostKeys: true,
	}
	res, err := c.SetIdentity(ctx, id)
	if err != nil {
		t.Fatalf("SetIdentity: %v", err)
	}
	// The network changes while the names are written: it is the last
	// step waited for.
	if got, want := strings.Join(res.Applied, ","), "clock,random-seed,hostname,machine-id,ssh-host-keys,network"; got != want {
		t.Errorf("Applied = %s, want %s", got, want)
	}
	for _, name := range append(res.Applied, "sync") {
		if _, ok := res.Took[name]; !ok {
			t.Errorf("Took has no time for step %s: %v", name, res.Took)
		}
	}
	calls := slices.Clone(sys.calls)
	if got, want := strings.Join(calls[:2], ","), "clock,reseed"; got != want {
		t.Errorf("first system calls = %s, want %s (before any key or name)", got, want)
	}
	slices.Sort(calls)
	if got, want := strings.Join(calls, ","), "clock,hostname,network,reseed,sshd"; got != want {
		t.Errorf("system calls (sorted) = %s, want %s", got, want)
	}
	if !sys.clock.Equal(time.Unix(0, now.UnixNano())) || string(sys.seed) != string(id.Seed) {
		t.Errorf("clock %v seed %q, want %v and the seed sent", sys.clock, sys.seed, now)
	}
	read := func(rel string) string {
		b, err := os.ReadFile(filepath.Join(root, rel)) //nolint:gosec // test root
		if err != nil {
			t.Fatalf("read %s: %v", rel, err)
		}
		return string(b)
	}
	if got := read("/etc/hostname"); got != "clone-1\n" {
		t.Errorf("/etc/hostname = %q", got)
	}
	if got := read("/etc/hosts"); got != "127.0.0.1\tlocalhost\n127.0.1.1\tclone-1\n" {
		t.Errorf("/etc/hosts = %q", got)
	}
	for _, p := range []string{"/etc/machine-id", "/var/lib/dbus/machine-id"} {
		if got := read(p); got != id.MachineID+"\n" {
			t.Errorf("%s = %q, want %s", p, got, id.MachineID)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "/etc/ssh/ssh_host_rsa_key")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("old RSA host key still there (%v)", err)
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(res.HostKey))
	if err != nil || pub.Type() != ssh.KeyAlgoED25519 {
		t.Fatalf("new host key %q: %v", res.HostKey, err)
	}
	if !strings.HasPrefix(read(guestabi.HostKey), res.HostKey) {
		t.Errorf("%s does not hold the reported key", guestabi.HostKey)
	}
	signer, err := ssh.ParsePrivateKey([]byte(read("/etc/ssh/ssh_host_ed25519_key")))
	if err != nil || string(signer.PublicKey().Marshal()) != string(pub.Marshal()) {
		t.Errorf("private host key does not match the public one: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(root, "/etc/ssh/ssh_host_ed25519_key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("private host key mode: %v %v", fi.Mode(), err)
	}

	// A failing step says which and what was done; no file step starts
	// after a failed one, and the network is waited for either way.
	for _, tc := range []struct{ fail, wantCalls string }{
		{"network", "clock,hostname,network,reseed,sshd"},
		{"hostname", "clock,hostname,network,reseed"},
	} {
		sys.calls, sys.fail = nil, tc.fail
		_, err = c.SetIdentity(ctx, id)
		if err == nil || !strings.Contains(err.Error(), tc.fail) || !strings.Contains(err.Error(), "random-seed") {
			t.Errorf("SetIdentity with a failing %s step = %v, want it to name the step and what was applied", tc.fail, err)
		}
		calls := slices.Clone(sys.calls)
		slices.Sort(calls)
		if got := strings.Join(calls, ","); got != tc.wantCalls {
			t.Errorf("calls (sorted) after a failing %s step = %s, want %s", tc.fail, got, tc.wantCalls)
		}
	}
}

// hostKeyPEM is a fresh ed25519 host key as the host sends it.
func hostKeyPEM(t *testing.T) []byte {
	t.Helper()
	priv, _, err := NewHostKey()
	if err != nil {
		t.Fatal(err)
	}
	return priv
}

// TestSetIdentityHostMadeKey: a host key sent with the identity is the
// one written and reported, not one the guest makes.
func TestSetIdentityHostMadeKey(t *testing.T) {
	useSystem(t, &recordingSystem{})
	s := newTestServer(t)
	priv, line, err := NewHostKey()
	if err != nil {
		t.Fatal(err)
	}
	resp := s.Handle(context.Background(), Request{V: ProtocolVersion, ID: 1, Op: OpSetIdentity, Identity: &Identity{NewHostKeys: true, HostKey: priv}})
	if resp.Error != nil || resp.Identity == nil {
		t.Fatalf("set_identity with a host key: %+v", resp.Error)
	}
	if resp.Identity.HostKey != line {
		t.Errorf("reported host key %q, want the one sent %q", resp.Identity.HostKey, line)
	}
	b, err := os.ReadFile(filepath.Join(s.Root, "/etc/ssh/ssh_host_ed25519_key"))
	if err != nil || string(b) != string(priv) {
		t.Errorf("private host key written = %q (%v), want the one sent", b, err)
	}
	pub, err := os.ReadFile(filepath.Join(s.Root, guestabi.HostKey))
	if err != nil || !strings.HasPrefix(string(pub), line+" ") {
		t.Errorf("%s = %q (%v), want %s", guestabi.HostKey, pub, err, line)
	}
}

func TestSetIdentityRefusesBadInput(t *testing.T) {
	useSystem(t, &recordingSystem{})
	s := newTestServer(t)
	for name, id := range map[string]Identity{
		"multicast mac":     {MAC: "01:00:5e:00:00:01"},
		"bad mac":           {MAC: "zz:00:00:00:00:00"},
		"ipv6 address":      {Address: "fd00::2/64"},
		"address no prefix": {Address: "10.0.0.2"},
		"bad gateway":       {Gateway: "gw"},
		"hostname slash":    {Hostname: "../etc"},
		"hostname newline":  {Hostname: "a\nb"},
		"machine id short":  {MachineID: "abc"},
		"machine id zeros":  {MachineID: strings.Repeat("0", 32)},
		"machine id upper":  {MachineID: strings.Repeat("A", 32)},
		"seed too large":    {Seed: make([]byte, 4096)},
		"negative time":     {HostTime: -1},
		"host key not pem":  {NewHostKeys: true, HostKey: []byte("not a key")},
		"host key alone":    {HostKey: hostKeyPEM(t)},
		"host key too long": {NewHostKeys: true, HostKey: make([]byte, 8192)},
	} {
		t.Run(name, func(t *testing.T) {
			if err := id.Validate(); !errors.Is(err, ErrInvalidArgument) {
				t.Errorf("Validate = %v, want ErrInvalidArgument", err)
			}
			// The agent checks again: a host is not trusted to validate.
			resp := s.Handle(context.Background(), Request{V: ProtocolVersion, ID: 1, Op: OpSetIdentity, Identity: &id})
			if resp.Error == nil || resp.Error.Code != CodeInvalidArgument {
				t.Errorf("Handle = %+v, want invalid_argument", resp.Error)
			}
		})
	}
	if resp := s.Handle(context.Background(), Request{V: ProtocolVersion, ID: 1, Op: OpSetIdentity}); resp.Error == nil || resp.Error.Code != CodeInvalidArgument {
		t.Errorf("set_identity without identity = %+v, want invalid_argument", resp.Error)
	}
}

// TestSetNetworkInNamespace runs the real network step on one end of a
// veth pair in a test network namespace (this kernel has no dummy links).
func TestSetNetworkInNamespace(t *testing.T) {
	testutil.InNetNS(t)
	old, _ := net.ParseMAC("06:00:0a:00:00:02")
	la := netlink.NewLinkAttrs()
	la.Name, la.HardwareAddr = "bgrid0", old
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "bgrid1"}); err != nil {
		t.Fatalf("add veth pair: %v", err)
	}
	link, err := netlink.LinkByName("bgrid0")
	if err != nil {
		t.Fatal(err)
	}
	peer, err := netlink.LinkByName("bgrid1")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range []netlink.Link{link, peer} {
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	saved, _ := netlink.ParseAddr("10.0.0.2/24")
	if err := netlink.AddrAdd(link, saved); err != nil {
		t.Fatal(err)
	}
	mac, _ := net.ParseMAC("06:00:0a:00:00:09")
	if err := (realSystem{}).setNetwork(old, mac, netip.MustParsePrefix("10.0.0.9/24"), netip.MustParseAddr("10.0.0.1")); err != nil {
		t.Fatalf("setNetwork: %v", err)
	}
	link, _ = netlink.LinkByName("bgrid0")
	if link.Attrs().HardwareAddr.String() != mac.String() {
		t.Errorf("MAC = %s, want %s", link.Attrs().HardwareAddr, mac)
	}
	addrs, _ := netlink.AddrList(link, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "10.0.0.9/24" {
		t.Errorf("addresses = %v, want only 10.0.0.9/24", addrs)
	}
	routes, _ := netlink.RouteList(link, netlink.FAMILY_V4)
	found := false
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.String() == "10.0.0.1" {
			found = true
		}
	}
	if !found {
		t.Errorf("routes %v lack a default route via 10.0.0.1", routes)
	}
	// An interface that is not there is an error that says so.
	gone, _ := net.ParseMAC("06:00:0a:00:00:77")
	if err := (realSystem{}).setNetwork(gone, mac, netip.Prefix{}, netip.Addr{}); err == nil || !strings.Contains(err.Error(), "06:00:0a:00:00:77") {
		t.Errorf("setNetwork on a missing interface = %v", err)
	}
}

// TestSetIdentityUnderAnotherRoot: an agent serving a directory tree (the
// fake Firecracker's) changes files there and never the system it runs on.
func TestSetIdentityUnderAnotherRoot(t *testing.T) {
	if _, ok := identitySystem.(realSystem); !ok {
		t.Fatal("the default identity system is not the real one")
	}
	s := newTestServer(t)
	host, _ := os.Hostname()
	res, err := s.setIdentity(&Identity{HostTime: 1, Hostname: "not-this-host", MachineID: NewMachineID(), MAC: "06:00:00:00:00:01", Address: "10.9.9.9/24"})
	if err != nil {
		t.Fatal(err)
	}
	if now, _ := os.Hostname(); now != host {
		t.Fatalf("the host's hostname changed to %q", now)
	}
	if time.Now().Year() < 2000 {
		t.Fatal("the host clock was stepped")
	}
	if b, _ := os.ReadFile(filepath.Join(s.Root, "etc/hostname")); string(b) != "not-this-host\n" {
		t.Errorf("etc/hostname under the agent root = %q", b)
	}
	t.Logf("applied under %s: %v", s.Root, res.Applied)
}
