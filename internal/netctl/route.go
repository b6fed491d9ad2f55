package netctl

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// uplinkProbe is the address whose route HasUplink looks up: TEST-NET-1
// (RFC 5737), which only a default route (or a route as wide) covers. The
// lookup reads the routing table; it sends nothing.
var uplinkProbe = net.IPv4(192, 0, 2, 1)

// HasUplink reports whether this host (in the caller's network namespace)
// routes addresses beyond its own networks, through an interface other
// than the bridge: without that, a guest behind the bridge reaches nothing
// past the host whatever NAT does. It reads the routing table (policy
// rules included) and sends no traffic.
func HasUplink(cfg Config) (bool, error) {
	cfg = cfg.WithDefaults()
	routes, err := netlink.RouteGet(uplinkProbe)
	switch {
	case errors.Is(err, unix.ENETUNREACH), errors.Is(err, unix.EHOSTUNREACH), errors.Is(err, unix.EINVAL):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("look up the host's route out: %w", err)
	}
	bridge := 0
	if l, err := netlink.LinkByName(cfg.Bridge); err == nil {
		bridge = l.Attrs().Index
	}
	for _, r := range routes {
		if r.LinkIndex != 0 && r.LinkIndex != bridge {
			return true, nil
		}
	}
	return false, nil
}
