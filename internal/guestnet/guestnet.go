// Package guestnet sets a guest's network and names: the Ethernet
// interface's MAC, address and default route through netlink (the image
// needs no ip or ifconfig), and the names in /etc/hosts. banger's PID 1
// and banger-network use it at boot, the agent when a clone takes its own
// identity, so the guest has one way of doing each.
package guestnet

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
)

// FindEthernet returns the interface whose MAC is mac, or the first
// Ethernet interface that is not loopback when mac is empty.
func FindEthernet(mac net.HardwareAddr) (netlink.Link, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	for _, l := range links {
		a := l.Attrs()
		if a.EncapType != "ether" || a.Flags&net.FlagLoopback != 0 {
			continue
		}
		if len(mac) > 0 && !bytes.Equal(a.HardwareAddr, mac) {
			continue
		}
		return l, nil
	}
	if len(mac) > 0 {
		return nil, fmt.Errorf("no interface with MAC %s", mac)
	}
	return nil, errors.New("no Ethernet interface")
}

// SetMAC gives link the MAC mac (nothing when it has it already). A driver
// that refuses a live change gets down, change, up.
func SetMAC(link netlink.Link, mac net.HardwareAddr) error {
	name := link.Attrs().Name
	if len(mac) == 0 || bytes.Equal(link.Attrs().HardwareAddr, mac) {
		return nil
	}
	err := netlink.LinkSetHardwareAddr(link, mac)
	if err == nil {
		return nil
	}
	if derr := netlink.LinkSetDown(link); derr != nil {
		return fmt.Errorf("set MAC %s on %s: %w", mac, name, err)
	}
	err = netlink.LinkSetHardwareAddr(link, mac)
	if uerr := netlink.LinkSetUp(link); err == nil {
		err = uerr
	}
	if err != nil {
		return fmt.Errorf("set MAC %s on %s: %w", mac, name, err)
	}
	return nil
}

// SetAddress sets link up with the IPv4 address addr and, when gw is
// valid, a default route through gw (replacing one that is there). With
// only, every other IPv4 address of link is removed first: deleting a
// primary address also deletes the secondaries of its subnet, which addr
// could be.
func SetAddress(link netlink.Link, addr netip.Prefix, gw netip.Addr, only bool) error {
	name := link.Attrs().Name
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	want := &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}}
	if only {
		olds, err := netlink.AddrList(link, netlink.FAMILY_V4)
		if err != nil {
			return fmt.Errorf("addresses of %s: %w", name, err)
		}
		for _, a := range olds {
			if !a.IP.Equal(want.IP) {
				if err := netlink.AddrDel(link, &a); err != nil {
					return fmt.Errorf("remove old address %s from %s: %w", a.IPNet, name, err)
				}
			}
		}
	}
	if err := netlink.AddrReplace(link, want); err != nil {
		return fmt.Errorf("address %s on %s: %w", addr, name, err)
	}
	if gw.IsValid() {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw.AsSlice(), Scope: netlink.SCOPE_UNIVERSE}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("default route via %s on %s: %w", gw, name, err)
		}
	}
	return nil
}

// Hosts returns the hosts file old with localhost and hostname named: the
// localhost lines are added when no line names localhost, and the
// 127.0.1.1 line is pointed at hostname, or added when there is none and
// no line names hostname yet. Other lines are kept as they are. It is
// idempotent.
func Hosts(old []byte, hostname string) []byte {
	var lines []string
	if s := strings.TrimRight(string(old), "\n"); s != "" {
		lines = strings.Split(s, "\n")
	}
	names := func(name string) bool {
		for _, line := range lines {
			f := strings.Fields(line)
			if len(f) > 0 && strings.HasPrefix(f[0], "#") {
				continue
			}
			for _, n := range f[min(1, len(f)):] {
				if n == name {
					return true
				}
			}
		}
		return false
	}
	if !names("localhost") {
		lines = append(lines, "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback")
	}
	if hostname != "" {
		found := false
		for i, line := range lines {
			if f := strings.Fields(line); len(f) > 0 && f[0] == "127.0.1.1" {
				lines[i], found = "127.0.1.1\t"+hostname, true
			}
		}
		if !found && !names(hostname) {
			lines = append(lines, "127.0.1.1\t"+hostname)
		}
	}
	return []byte(strings.Join(lines, "\n") + "\n")
}
