package portfwd

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Proto is a published port's transport protocol.
type Proto string

// Protocols a Spec can name.
const (
	TCP Proto = "tcp"
	UDP Proto = "udp"
)

// DefaultHostIP is the host address a Spec binds when it names none. Unlike
// docker (0.0.0.0) banger publishes on loopback unless told otherwise: a
// developer's VM should not be reachable from the network by default.
var DefaultHostIP = netip.MustParseAddr("127.0.0.1")

// ErrInvalidSpec is a -p value that does not parse. Errors from ParseSpecs
// wrap it.
var ErrInvalidSpec = errors.New("invalid port spec")

// Spec is one published port: the host side HostIP:HostPort, the guest side
// GuestPort on the guest's loopback (or its own address), over Proto.
type Spec struct {
	HostIP netip.Addr `json:"host_ip"`
	// HostPort 0 asks for any free port; the bound port is reported by
	// Listener.Spec.
	HostPort  uint16 `json:"host_port"`
	GuestPort uint16 `json:"guest_port"`
	Proto     Proto  `json:"proto"`
}

// String formats s as ParseSpecs reads it: HOSTIP:HOSTPORT:GUESTPORT/PROTO,
// with an IPv6 address in brackets.
func (s Spec) String() string {
	ip := s.HostIP.String()
	if s.HostIP.Is6() {
		ip = "[" + ip + "]"
	}
	return fmt.Sprintf("%s:%d:%d/%s", ip, s.HostPort, s.GuestPort, s.Proto)
}

// HostAddr is the host side as an address, e.g. "127.0.0.1:8080".
func (s Spec) HostAddr() netip.AddrPort { return netip.AddrPortFrom(s.HostIP, s.HostPort) }

// NeedsRoot reports whether binding s's host side is a privileged act that
// only root may ask the daemon for: a port below 1024, or an address other
// than loopback (which would open the VM to the network).
func (s Spec) NeedsRoot() bool {
	return (s.HostPort != 0 && s.HostPort < 1024) || !s.HostIP.IsLoopback()
}

// ParseSpecs parses one -p value in docker's form
//
//	[HOSTIP:][HOSTPORT:]GUESTPORT[/tcp|/udp]
//
// where HOSTIP defaults to DefaultHostIP (IPv6 in brackets: [::1]:8080:80),
// an empty or absent HOSTPORT means 0 (any free port), the protocol defaults
// to tcp, and HOSTPORT and GUESTPORT may be ranges of equal length
// (8000-8002:9000-9002), which give one Spec per port.
func ParseSpecs(value string) ([]Spec, error) {
	bad := func(format string, args ...any) ([]Spec, error) {
		return nil, fmt.Errorf("%w %q: %s (want [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp], e.g. 8080:80 or 127.0.0.1:0:80/udp)",
			ErrInvalidSpec, value, fmt.Sprintf(format, args...))
	}
	rest := value
	proto := TCP
	if i := strings.LastIndexByte(rest, '/'); i >= 0 {
		switch p := Proto(strings.ToLower(rest[i+1:])); p {
		case TCP, UDP:
			proto = p
		default:
			return bad("protocol %q is not tcp or udp", rest[i+1:])
		}
		rest = rest[:i]
	}
	hostIP := DefaultHostIP
	bracketed := strings.HasPrefix(rest, "[")
	if bracketed {
		end := strings.Index(rest, "]:")
		if end < 0 {
			return bad("an IPv6 address in brackets must be followed by :HOSTPORT:GUESTPORT")
		}
		ip, err := netip.ParseAddr(rest[1:end])
		if err != nil || !ip.Is6() || ip.Zone() != "" {
			return bad("%q is not an IPv6 address", rest[1:end])
		}
		hostIP, rest = ip, rest[end+2:]
		if !strings.Contains(rest, ":") {
			return bad("an address needs HOSTPORT:GUESTPORT after it")
		}
	}
	parts := strings.Split(rest, ":")
	var hostPart, guestPart string
	switch len(parts) {
	case 1:
		guestPart = parts[0]
	case 2:
		hostPart, guestPart = parts[0], parts[1]
	case 3:
		if bracketed {
			return bad("too many fields")
		}
		ip, err := netip.ParseAddr(parts[0])
		if err != nil || !ip.Is4() {
			return bad("%q is not an IPv4 address (write IPv6 addresses in brackets)", parts[0])
		}
		hostIP, hostPart, guestPart = ip, parts[1], parts[2]
	default:
		return bad("too many fields (write IPv6 addresses in brackets)")
	}
	if hostIP.IsMulticast() {
		return bad("%s is a multicast address", hostIP)
	}
	gLo, gHi, err := parsePortRange(guestPart, false)
	if err != nil {
		return bad("guest port: %v", err)
	}
	hLo, hHi := uint16(0), uint16(0)
	if hostPart != "" {
		if hLo, hHi, err = parsePortRange(hostPart, true); err != nil {
			return bad("host port: %v", err)
		}
	}
	n := int(gHi-gLo) + 1
	switch {
	case hostPart == "" || (hLo == 0 && hHi == 0):
		if n > 1 {
			return bad("a guest port range needs a host port range of the same length")
		}
	case int(hHi-hLo)+1 != n:
		return bad("host range has %d ports, guest range %d", int(hHi-hLo)+1, n)
	}
	specs := make([]Spec, 0, n)
	for i := 0; i < n; i++ {
		s := Spec{HostIP: hostIP, GuestPort: gLo + uint16(i), Proto: proto}
		if hLo != 0 {
			s.HostPort = hLo + uint16(i)
		}
		specs = append(specs, s)
	}
	return specs, nil
}

// parsePortRange parses "N" or "LO-HI". zeroOK allows the single port 0.
func parsePortRange(s string, zeroOK bool) (lo, hi uint16, err error) {
	loS, hiS, isRange := strings.Cut(s, "-")
	if lo, err = parsePort(loS, zeroOK && !isRange); err != nil {
		return 0, 0, err
	}
	if !isRange {
		return lo, lo, nil
	}
	if hi, err = parsePort(hiS, false); err != nil {
		return 0, 0, err
	}
	if hi < lo {
		return 0, 0, fmt.Errorf("range %s ends before it starts", s)
	}
	return lo, hi, nil
}

func parsePort(s string, zeroOK bool) (uint16, error) {
	if s == "" {
		return 0, errors.New("empty")
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || (s[0] == '0' && len(s) > 1) || s[0] == '+' {
		return 0, fmt.Errorf("%q is not a port number (0-65535)", s)
	}
	if n == 0 && !zeroOK {
		return 0, errors.New("port 0 is not allowed here")
	}
	return uint16(n), nil
}

// CheckDistinct refuses two specs that bind the same host address and
// protocol (port 0 never collides: each gets its own free port).
func CheckDistinct(specs []Spec) error {
	seen := make(map[string]bool, len(specs))
	for _, s := range specs {
		if s.HostPort == 0 {
			continue
		}
		k := s.HostAddr().String() + "/" + string(s.Proto)
		if seen[k] {
			return fmt.Errorf("%w: host %s/%s is published twice", ErrInvalidSpec, s.HostAddr(), s.Proto)
		}
		seen[k] = true
	}
	return nil
}
