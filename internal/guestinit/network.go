package guestinit

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/guestabi"
)

// upLoopback brings lo up.
func upLoopback() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	return nil
}

// configureNetwork gives the interface whose MAC is n.MAC (or the first
// Ethernet interface) n.Address and a default route through n.Gateway,
// through netlink: the image needs no ip or ifconfig. It waits up to wait
// for the interface to appear. It returns the interface name.
func configureNetwork(n guestabi.Network, wait time.Duration) (string, error) {
	if !n.Configured() {
		return "", nil
	}
	deadline := time.Now().Add(wait)
	var link netlink.Link
	for {
		var err error
		if link, err = findEthernet(n.MAC); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return "", err
		}
		time.Sleep(50 * time.Millisecond)
	}
	name := link.Attrs().Name
	if err := netlink.LinkSetUp(link); err != nil {
		return name, fmt.Errorf("set %s up: %w", name, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: n.Address.Addr().AsSlice(), Mask: net.CIDRMask(n.Address.Bits(), 32)}}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return name, fmt.Errorf("address %s on %s: %w", n.Address, name, err)
	}
	if n.Gateway.IsValid() {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: n.Gateway.AsSlice(), Scope: netlink.SCOPE_UNIVERSE}
		if err := netlink.RouteReplace(r); err != nil {
			return name, fmt.Errorf("default route via %s on %s: %w", n.Gateway, name, err)
		}
	}
	return name, nil
}

// findEthernet returns the interface with the MAC mac, or the first
// Ethernet interface that is not loopback when mac is empty.
func findEthernet(mac net.HardwareAddr) (netlink.Link, error) {
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

// writeNameFiles sets the hostname and writes /etc/hosts and (when dns is
// set) /etc/resolv.conf under root. A resolv.conf symlink (a resolver
// daemon's stub) is replaced by a file.
func writeNameFiles(root, hostname string, dns []string) error {
	var errs []error
	if hostname != "" {
		if err := unix.Sethostname([]byte(hostname)); err != nil {
			errs = append(errs, fmt.Errorf("set hostname %s: %w", hostname, err))
		}
		if err := writeFileAtomic(filepath.Join(root, "etc/hostname"), []byte(hostname+"\n"), 0o644); err != nil {
			errs = append(errs, err)
		}
	}
	if err := writeHosts(filepath.Join(root, "etc/hosts"), hostname); err != nil {
		errs = append(errs, err)
	}
	if len(dns) > 0 {
		var b strings.Builder
		b.WriteString("# written by banger-init from the kernel command line\n")
		for _, s := range dns {
			fmt.Fprintf(&b, "nameserver %s\n", s)
		}
		if err := writeFileAtomic(filepath.Join(root, "etc/resolv.conf"), []byte(b.String()), 0o644); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// writeHosts makes sure hosts names localhost and hostname.
func writeHosts(path, hostname string) error {
	old, err := os.ReadFile(path) //nolint:gosec // fixed guest path
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("read %s: %w", path, err)
	}
	content := string(old)
	has := func(name string) bool {
		for _, line := range strings.Split(content, "\n") {
			f := strings.Fields(line)
			for _, n := range f[min(1, len(f)):] {
				if n == name {
					return true
				}
			}
		}
		return false
	}
	add := ""
	if !has("localhost") {
		add += "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
	}
	if hostname != "" && !has(hostname) {
		add += "127.0.1.1\t" + hostname + "\n"
	}
	if add == "" {
		return nil
	}
	if content != "" && !strings.HasSuffix(content, "\n") {
		content += "\n"
	}
	return writeFileAtomic(path, []byte(content+add), 0o644)
}

// writeFileAtomic writes data to path through a temporary file and a
// rename, replacing a symlink at path instead of writing through it.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := path + ".banger.tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil { //nolint:gosec // fixed guest paths under the guest root
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
