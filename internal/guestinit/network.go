package guestinit

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/atomicfile"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/guestnet"
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
		if link, err = guestnet.FindEthernet(n.MAC); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return "", err
		}
		time.Sleep(50 * time.Millisecond)
	}
	return link.Attrs().Name, guestnet.SetAddress(link, n.Address, n.Gateway, false)
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
	if b := guestnet.Hosts(old, hostname); !bytes.Equal(b, old) {
		return writeFileAtomic(path, b, 0o644)
	}
	return nil
}

// writeFileAtomic writes data to path through a temporary file and a
// rename, replacing a symlink at path instead of writing through it.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return atomicfile.Replace(path, data, mode)
}
