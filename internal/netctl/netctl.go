// Package netctl owns banger's host networking: the bridge VMs attach to,
// one tap device per VM, guest MAC and IP addresses, and the NAT rules that
// let guests reach the outside world.
//
// Every link banger creates carries its identity in the interface alias
// (ifalias): a VM's tap is tagged "banger:<vm-id>". Teardown refuses to
// delete a link whose alias does not match, so a corrupt record that names
// "lo" or "eth0" can never remove them. Teardown is idempotent: a link that
// is already gone counts as removed.
//
// All functions act on the network namespace of the calling OS thread. The
// daemon calls them from the host namespace; tests lock their goroutine to a
// thread inside a namespace they created (see testutil.InNetNS).
package netctl

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
)

// Defaults for Config.
const (
	DefaultBridge = "banger0"
	TapPrefix     = "bgr-"    // every tap banger creates starts with this
	AliasPrefix   = "banger:" // a tap's alias is AliasPrefix + vm id
)

// DefaultSubnet is the subnet guests get addresses from when Config.Subnet
// is not set.
var DefaultSubnet = netip.MustParsePrefix("172.30.0.0/24")

// Sentinel errors; test them with errors.Is.
var (
	// ErrNotOurs means a link exists but does not carry banger's alias for
	// the VM in question; banger refuses to touch it.
	ErrNotOurs = errors.New("not created by banger for this VM")
	// ErrNameTaken means a link with the name banger wants already exists
	// and belongs to someone else.
	ErrNameTaken = errors.New("interface name already in use")
	// ErrInvalidVMID means a VM id has characters banger does not accept.
	ErrInvalidVMID = errors.New("invalid VM id")
	// ErrSubnetFull means no address is left to allocate.
	ErrSubnetFull = errors.New("no free address in subnet")
)

// Config names the bridge and subnet. The zero value means the defaults.
type Config struct {
	Bridge string       // bridge name; DefaultBridge when empty
	Subnet netip.Prefix // IPv4 subnet; DefaultSubnet when invalid (zero)
	// TapUID and TapGID own the taps CreateTap makes (0: root). A VM
	// monitor that opens its tap by name after dropping privileges
	// (Firecracker under the jailer) needs the tap to be its user's.
	TapUID, TapGID uint32
}

// WithDefaults returns c with empty fields set to the defaults.
func (c Config) WithDefaults() Config {
	if c.Bridge == "" {
		c.Bridge = DefaultBridge
	}
	if !c.Subnet.IsValid() {
		c.Subnet = DefaultSubnet
	}
	c.Subnet = c.Subnet.Masked()
	return c
}

// Validate checks the bridge name and that the subnet is an IPv4 prefix with
// room for the gateway and at least one guest.
func (c Config) Validate() error {
	c = c.WithDefaults()
	if err := validIfName(c.Bridge); err != nil {
		return fmt.Errorf("bridge: %w", err)
	}
	if !c.Subnet.Addr().Is4() {
		return fmt.Errorf("subnet %s: only IPv4 subnets are supported", c.Subnet)
	}
	if c.Subnet.Bits() > 30 {
		return fmt.Errorf("subnet %s is too small: use /30 or larger", c.Subnet)
	}
	return nil
}

// Gateway returns the host's address on the bridge: the first host address
// of the subnet (172.30.0.1 for the default).
func (c Config) Gateway() netip.Addr {
	return Gateway(c.WithDefaults().Subnet)
}

// Gateway returns the first host address of subnet.
func Gateway(subnet netip.Prefix) netip.Addr {
	return subnet.Masked().Addr().Next()
}

var vmIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)

// ValidateVMID checks that id is 1 to 64 letters, digits, '_' or '-',
// starting with a letter or digit, so it is safe inside an interface alias.
func ValidateVMID(id string) error {
	if !vmIDRE.MatchString(id) {
		return fmt.Errorf("%w: %q (want 1-64 letters, digits, '_' or '-')", ErrInvalidVMID, id)
	}
	return nil
}

// TapName returns the tap name for a VM: TapPrefix followed by 11 hex
// characters of the SHA-256 of the VM id, 15 bytes in all (the kernel's
// limit). It is a hash rather than an id prefix so that ids sharing a
// prefix (time-ordered ids do) still get distinct taps. The full id is in
// the tap's alias.
func TapName(vmID string) string {
	sum := sha256.Sum256([]byte("banger-tap:" + vmID))
	return TapPrefix + hex.EncodeToString(sum[:])[:15-len(TapPrefix)]
}

// TapAlias returns the alias that marks a tap as banger's for vmID.
func TapAlias(vmID string) string { return AliasPrefix + vmID }

// TapRef is what a VM's record keeps of its tap: the name, and the alias
// that proves the tap is the VM's (DeleteTap checks it on the kernel's
// interface before it removes anything).
type TapRef struct {
	Name  string `json:"name"`
	Alias string `json:"alias,omitempty"`
}

// TapRefFor is the tap of VM vmID.
func TapRefFor(vmID string) TapRef { return TapRef{Name: TapName(vmID), Alias: TapAlias(vmID)} }

// MACFor returns the guest MAC address for a VM: six bytes of a SHA-256 of
// the id, with the locally administered bit set and the multicast bit
// cleared. The same id always gives the same address.
func MACFor(vmID string) net.HardwareAddr {
	sum := sha256.Sum256([]byte("banger-mac:" + vmID))
	mac := net.HardwareAddr(append([]byte(nil), sum[:6]...))
	mac[0] = (mac[0] | 0x02) &^ 0x01
	return mac
}

func validIfName(name string) error {
	if name == "" || len(name) > 15 {
		return fmt.Errorf("interface name %q must be 1-15 bytes", name)
	}
	for _, r := range name {
		if r <= ' ' || r == '/' || r == ':' || r >= 0x7f {
			return fmt.Errorf("interface name %q has a forbidden character %q", name, r)
		}
	}
	if name == "." || name == ".." {
		return fmt.Errorf("interface name %q is reserved", name)
	}
	return nil
}
