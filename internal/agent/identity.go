package agent

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/atomicfile"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/guestnet"
)

// OpSetIdentity gives a guest restored from a snapshot an identity of its
// own, before the host marks it ready: the clock is stepped to the host's
// time, the random pool is reseeded, the network interface gets its new MAC
// and address, and the hostname, /etc/machine-id and the SSH host keys are
// replaced (the reply carries the new host key for the host to pin). Added
// in agent protocol v1 without a version bump: an older agent answers
// unknown_op and the host refuses to mark the clone ready.
const OpSetIdentity = "set_identity"

// Identity is the argument of OpSetIdentity. Empty fields are left alone.
type Identity struct {
	// HostTime is the host's wall clock (Unix nanoseconds) when it sent the
	// request: the guest clock is stepped to it.
	HostTime int64 `json:"host_time_ns,omitempty"`
	// Seed is fresh randomness (at most 512 bytes) mixed into the guest's
	// pool, which a restored guest would otherwise share with its siblings.
	Seed []byte `json:"seed,omitempty"`
	// OldMAC selects the interface to change (the saved VM's MAC); empty
	// means the first Ethernet interface.
	OldMAC string `json:"old_mac,omitempty"`
	// MAC is the interface's new MAC.
	MAC string `json:"mac,omitempty"`
	// Address is the interface's new address with its prefix
	// ("172.30.0.5/24"); the interface's other IPv4 addresses are removed.
	Address string `json:"address,omitempty"`
	// Gateway is the default route's new next hop.
	Gateway  string `json:"gateway,omitempty"`
	Hostname string `json:"hostname,omitempty"`
	// MachineID is the new /etc/machine-id: 32 lowercase hex digits.
	MachineID string `json:"machine_id,omitempty"`
	// NewHostKeys replaces the SSH host keys with a fresh ed25519 key and
	// makes a running sshd load it.
	NewHostKeys bool `json:"new_host_keys,omitempty"`
	// HostKey, with NewHostKeys, is that key, made by the host
	// (NewHostKey): the ed25519 private key in OpenSSH's PEM form. Without
	// it the guest makes the key itself, as agents before it did (an
	// older agent ignores it and does so too); under emulation, making
	// the key in a just-restored guest cost as much as the rest of the
	// identity.
	HostKey []byte `json:"host_key,omitempty"`
}

// maxIdentityKeyBytes bounds Identity.HostKey (an ed25519 key's PEM is
// about 400 bytes).
const maxIdentityKeyBytes = 4096

// IdentityResult is the reply to OpSetIdentity.
type IdentityResult struct {
	// Applied lists the steps done, in order.
	Applied []string `json:"applied"`
	// Took is how long each step of Applied took in the guest, and "sync"
	// the flush of the new files (the network runs beside the file
	// steps, so the times may overlap).
	Took map[string]time.Duration `json:"took_ns,omitempty"`
	// ClockStep is how far the guest clock was moved.
	ClockStep time.Duration `json:"clock_step_ns,omitempty"`
	// HostKey is the new ed25519 host key (authorized_keys format). It
	// comes from the guest: validate it before pinning it.
	HostKey string `json:"host_key,omitempty"`
}

var (
	machineIDRE = regexp.MustCompile(`^[0-9a-f]{32}$`)
	hostnameRE  = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`)
)

// maxSeedBytes bounds Identity.Seed.
const maxSeedBytes = 512

// Validate checks every field, on both ends.
func (id *Identity) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("identity: %s: %w", fmt.Sprintf(format, a...), ErrInvalidArgument)
	}
	if len(id.Seed) > maxSeedBytes {
		return bad("seed of %d bytes (at most %d)", len(id.Seed), maxSeedBytes)
	}
	for _, m := range []struct{ what, mac string }{{"mac", id.MAC}, {"old_mac", id.OldMAC}} {
		if m.mac == "" {
			continue
		}
		hw, err := net.ParseMAC(m.mac)
		if err != nil || len(hw) != 6 {
			return bad("%s %q is not a MAC address", m.what, m.mac)
		}
		if m.what == "mac" && hw[0]&1 != 0 {
			return bad("mac %q is a multicast address", m.mac)
		}
	}
	if id.Address != "" {
		p, err := netip.ParsePrefix(id.Address)
		if err != nil || !p.Addr().Is4() {
			return bad("address %q is not an IPv4 address with a prefix length", id.Address)
		}
	}
	if id.Gateway != "" {
		if a, err := netip.ParseAddr(id.Gateway); err != nil || !a.Is4() {
			return bad("gateway %q is not an IPv4 address", id.Gateway)
		}
	}
	if id.Hostname != "" && !hostnameRE.MatchString(id.Hostname) {
		return bad("hostname %q is not a valid host name", id.Hostname)
	}
	if id.MachineID != "" && (!machineIDRE.MatchString(id.MachineID) || strings.Trim(id.MachineID, "0") == "") {
		return bad("machine id %q: want 32 lowercase hex digits, not all zero", id.MachineID)
	}
	if id.HostTime < 0 {
		return bad("host time %d is negative", id.HostTime)
	}
	if len(id.HostKey) > 0 {
		if !id.NewHostKeys {
			return bad("a host key without new_host_keys")
		}
		if len(id.HostKey) > maxIdentityKeyBytes {
			return bad("host key of %d bytes (at most %d)", len(id.HostKey), maxIdentityKeyBytes)
		}
		if _, err := parseHostKey(id.HostKey); err != nil {
			return bad("host key: %v", err)
		}
	}
	return nil
}

// identitySystem is what set_identity does to the running guest beyond its
// files; tests replace it.
var identitySystem identitySys = realSystem{}

type identitySys interface {
	setClock(t time.Time) error
	reseed(seed []byte) error
	setNetwork(oldMAC, mac net.HardwareAddr, addr netip.Prefix, gw netip.Addr) error
	setHostname(name string) error
	reloadSSHD() error
}

// setIdentity applies id: clock first (so file times and key generation
// see the right time), then randomness (before any key is made); then the
// network while the names, machine id and host keys are written. It stops
// at the first failure; Applied says what was done, Took how long each
// step took.
func (s *Server) setIdentity(id *Identity) (*IdentityResult, error) {
	if id == nil {
		return nil, fmt.Errorf("set_identity without an identity: %w", ErrInvalidArgument)
	}
	if err := id.Validate(); err != nil {
		return nil, err
	}
	res := &IdentityResult{Took: map[string]time.Duration{}}
	sys := identitySystem
	if _, real := sys.(realSystem); real && s.Root != "" && s.Root != "/" {
		// An agent serving a directory tree (the fake Firecracker's, an
		// image under test) is not the guest's system: its files are
		// changed, never the clock, hostname or interfaces of the host
		// it runs on.
		sys = filesOnly{}
	}
	step := func(name string, began time.Time, err error) error {
		if err != nil {
			return fmt.Errorf("set identity: %s (after %v): %w", name, res.Applied, err)
		}
		res.Applied = append(res.Applied, name)
		res.Took[name] = time.Since(began)
		return nil
	}
	if id.HostTime > 0 {
		host := time.Unix(0, id.HostTime)
		res.ClockStep = time.Until(host)
		began := time.Now()
		if err := step("clock", began, sys.setClock(host)); err != nil {
			return res, err
		}
	}
	if len(id.Seed) > 0 {
		began := time.Now()
		if err := step("random-seed", began, sys.reseed(id.Seed)); err != nil {
			return res, err
		}
	}
	// The network is changed, and a host key the host did not send is
	// made from the reseeded pool, while the names are written: right
	// after a restore each of them runs guest code that emulation has to
	// translate first (netlink and the first file written took 50-60 ms
	// each on busybox, the key as much as the rest), and on two vCPUs
	// they overlap. Nothing of the key is written until its step.
	var keyMade chan newHostKey
	if id.NewHostKeys {
		keyMade = make(chan newHostKey, 1)
		if len(id.HostKey) > 0 {
			k, err := parseHostKey(id.HostKey) // checked by Validate
			k.err = err
			keyMade <- k
		} else {
			go func() { keyMade <- makeHostKey() }()
		}
	}
	var netDone chan error
	netBegan := time.Now()
	if id.MAC != "" || id.Address != "" {
		oldMAC, _ := net.ParseMAC(id.OldMAC)
		mac, _ := net.ParseMAC(id.MAC)
		var addr netip.Prefix
		var gw netip.Addr
		if id.Address != "" {
			addr = netip.MustParsePrefix(id.Address)
		}
		if id.Gateway != "" {
			gw = netip.MustParseAddr(id.Gateway)
		}
		netDone = make(chan error, 1)
		go func() { netDone <- sys.setNetwork(oldMAC, mac, addr, gw) }()
	}
	// The network step is always waited for, even when a file step fails
	// first: set_identity leaves nothing running behind its reply.
	network := func() error {
		if netDone == nil {
			return nil
		}
		err := <-netDone
		netDone = nil
		return step("network", netBegan, err)
	}
	if err := s.writeNames(id, sys, keyMade, res, step); err != nil {
		_ = network()
		return res, err
	}
	if err := network(); err != nil {
		return res, err
	}
	// The files above are written and renamed without a flush each; one
	// syncfs makes them all durable before the host marks the VM ready
	// (a guest that crashes later boots with its own identity, not its
	// source's). A flush per file cost a host fdatasync each.
	if id.Hostname != "" || id.MachineID != "" || id.NewHostKeys {
		began := time.Now()
		if err := s.syncRoot(); err != nil {
			return res, fmt.Errorf("set identity: sync the new files (after %v): %w", res.Applied, err)
		}
		res.Took["sync"] = time.Since(began)
	}
	return res, nil
}

// writeNames is the part of setIdentity that runs while the network
// changes: the hostname, the machine id and the host keys (made by
// keyMade), each a step.
func (s *Server) writeNames(id *Identity, sys identitySys, keyMade <-chan newHostKey, res *IdentityResult, step func(string, time.Time, error) error) error {
	if id.Hostname != "" {
		began := time.Now()
		err := sys.setHostname(id.Hostname)
		if err == nil {
			err = s.writeHostname(id.Hostname)
		}
		if err := step("hostname", began, err); err != nil {
			return err
		}
	}
	if id.MachineID != "" {
		began := time.Now()
		if err := step("machine-id", began, s.writeMachineID(id.MachineID)); err != nil {
			return err
		}
	}
	if id.NewHostKeys {
		began := time.Now()
		key, err := s.replaceHostKeys(<-keyMade)
		if err == nil {
			res.HostKey = key
			err = sys.reloadSSHD()
		}
		if err := step("ssh-host-keys", began, err); err != nil {
			return err
		}
	}
	return nil
}

// syncRoot flushes the filesystem that holds the agent's /etc.
func (s *Server) syncRoot() error {
	f, err := os.Open(s.path("/etc")) //nolint:gosec // a fixed guest path under the agent's root
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// writeHostname writes /etc/hostname and points the 127.0.1.1 line of
// /etc/hosts at the new name.
func (s *Server) writeHostname(name string) error {
	if err := replaceFile(s.path("/etc/hostname"), []byte(name+"\n"), 0o644); err != nil {
		return err
	}
	hostsPath := s.path("/etc/hosts")
	old, err := readBounded(hostsPath, 1<<20)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return replaceFile(hostsPath, guestnet.Hosts(old, name), 0o644)
}

// writeMachineID replaces /etc/machine-id, and D-Bus's copy when it is a
// file of its own rather than a link to it.
func (s *Server) writeMachineID(id string) error {
	if err := replaceFile(s.path("/etc/machine-id"), []byte(id+"\n"), 0o444); err != nil {
		return err
	}
	dbus := s.path("/var/lib/dbus/machine-id")
	if fi, err := os.Lstat(dbus); err == nil && fi.Mode().IsRegular() {
		return replaceFile(dbus, []byte(id+"\n"), 0o444)
	}
	return nil
}

// newHostKey is a fresh ed25519 host key: the private key in OpenSSH's PEM
// form and the public one as an authorized_keys line.
type newHostKey struct {
	privPEM []byte
	line    string
	err     error
}

// makeHostKey makes a fresh ed25519 host key from crypto/rand.
func makeHostKey() newHostKey {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return newHostKey{err: err}
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		return newHostKey{err: err}
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return newHostKey{err: err}
	}
	return newHostKey{privPEM: pem.EncodeToMemory(block), line: strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub)))}
}

// NewHostKey makes a fresh ed25519 SSH host key for Identity.HostKey: the
// private key in OpenSSH's PEM form and the public one as an
// authorized_keys line ("ssh-ed25519 AAAA...").
func NewHostKey() (privPEM []byte, line string, err error) {
	k := makeHostKey()
	return k.privPEM, k.line, k.err
}

// parseHostKey reads an ed25519 private key in OpenSSH's PEM form, as
// Identity.HostKey holds it.
func parseHostKey(privPEM []byte) (newHostKey, error) {
	raw, err := ssh.ParseRawPrivateKey(privPEM)
	if err != nil {
		return newHostKey{}, err
	}
	priv, ok := raw.(*ed25519.PrivateKey)
	if !ok {
		return newHostKey{}, fmt.Errorf("a %T, not an ed25519 key", raw)
	}
	sshPub, err := ssh.NewPublicKey(priv.Public())
	if err != nil {
		return newHostKey{}, err
	}
	return newHostKey{privPEM: privPEM, line: strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub)))}, nil
}

// replaceHostKeys removes every SSH host key (they are the saved VM's, and
// its siblings') and writes the fresh ed25519 pair k; it returns the public
// key.
func (s *Server) replaceHostKeys(k newHostKey) (string, error) {
	if k.err != nil {
		return "", k.err
	}
	olds, _ := filepath.Glob(s.path("/etc/ssh/ssh_host_*_key*"))
	for _, p := range olds {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", err
		}
	}
	line := k.line
	privPath := strings.TrimSuffix(s.path(guestabi.HostKey), ".pub")
	if err := os.MkdirAll(filepath.Dir(privPath), 0o755); err != nil {
		return "", err
	}
	if err := replaceFile(privPath, k.privPEM, 0o600); err != nil {
		return "", err
	}
	if err := replaceFile(s.path(guestabi.HostKey), []byte(line+" root@banger\n"), 0o644); err != nil {
		return "", err
	}
	return line, nil
}

// replaceFile writes data beside path and renames it over path, so a
// symlink at path is replaced, never written through. It does not flush:
// setIdentity syncs the filesystem once when every file is written.
func replaceFile(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return atomicfile.Replace(path, data, mode)
}

func readBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path) //nolint:gosec // a fixed guest path under the agent's root
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var b bytes.Buffer
	if _, err := b.ReadFrom(&limitedReader{f, limit}); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

type limitedReader struct {
	f *os.File
	n int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, fmt.Errorf("file larger than the agent reads: %w", ErrInvalidArgument)
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.f.Read(p)
	l.n -= int64(n)
	return n, err
}

// filesOnly is the system of an agent whose root is not "/": nothing but
// files is touched.
type filesOnly struct{}

func (filesOnly) setClock(time.Time) error { return nil }
func (filesOnly) reseed([]byte) error      { return nil }
func (filesOnly) setNetwork(_, _ net.HardwareAddr, _ netip.Prefix, _ netip.Addr) error {
	return nil
}
func (filesOnly) setHostname(string) error { return nil }
func (filesOnly) reloadSSHD() error        { return nil }

// realSystem acts on the running guest.
type realSystem struct{}

func (realSystem) setClock(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
}

// reseed mixes seed into the kernel's pool (writing to /dev/urandom) and
// asks for an immediate reseed of the CRNG (RNDRESEEDCRNG, Linux 4.17+),
// so the restored guest's random numbers part from its siblings' at once.
func (realSystem) reseed(seed []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write(seed); err != nil {
		return err
	}
	const rndReseedCRNG = 0x5207 // _IO('R', 0x07)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndReseedCRNG, 0); errno != 0 && errno != unix.EINVAL && errno != unix.ENOTTY {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

// setNetwork sets the new MAC on the interface that had oldMAC (the
// virtio-net driver passes it to the device: QEMU and Firecracker accept
// a live MAC change), replaces its IPv4 addresses with addr and the
// default route with one through gw.
func (realSystem) setNetwork(oldMAC, mac net.HardwareAddr, addr netip.Prefix, gw netip.Addr) error {
	link, err := guestnet.FindEthernet(oldMAC)
	if err != nil {
		return err
	}
	if err := guestnet.SetMAC(link, mac); err != nil {
		return err
	}
	if !addr.IsValid() {
		return nil
	}
	return guestnet.SetAddress(link, addr, gw, true)
}

func (realSystem) setHostname(name string) error { return unix.Sethostname([]byte(name)) }

// reloadSSHD sends SIGHUP to every running sshd listener (an sshd whose
// parent is not an sshd): sshd re-executes itself and loads the new host
// keys; open sessions are not affected.
func (realSystem) reloadSSHD() error {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	comm := func(pid int) string {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
		return strings.TrimSpace(string(b))
	}
	var errs []error
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || comm(pid) != "sshd" {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(stat, ')')
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 2 {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); comm(ppid) == "sshd" {
			continue // a session, not the listener
		}
		if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
			errs = append(errs, fmt.Errorf("SIGHUP sshd %d: %w", pid, err))
		}
	}
	return errors.Join(errs...)
}

// SetIdentity asks the agent to apply id (see OpSetIdentity). id is
// validated here first; the reply is untrusted guest data.
func (c *Client) SetIdentity(ctx context.Context, id Identity) (*IdentityResult, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	resp, err := c.call(ctx, Request{Op: OpSetIdentity, Identity: &id}, nil)
	if err != nil {
		return nil, err
	}
	if resp.Identity == nil {
		return nil, fmt.Errorf("set_identity: reply without result: %w", ErrBadFrame)
	}
	return resp.Identity, nil
}

// NewMachineID returns a random machine id in /etc/machine-id's form.
func NewMachineID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40 // a v4 UUID, as systemd-machine-id-setup makes
	b[8] = b[8]&0x3f | 0x80
	return hex.EncodeToString(b)
}
