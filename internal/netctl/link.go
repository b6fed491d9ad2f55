package netctl

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Tap describes a tap device banger created for a VM.
type Tap struct {
	Name   string // e.g. "bgr-3fa94c98e6b"
	VMID   string // from the alias
	Alias  string // "banger:<vm-id>"
	Index  int    // interface index
	Bridge string // name of the bridge it is attached to, "" if none
	Up     bool
}

// EnsureBridge creates the bridge if it is missing, assigns the gateway
// address (first host address of the subnet) and brings it up. It is
// idempotent. A non-bridge link that already has the name is an error
// (ErrNameTaken).
func EnsureBridge(ctx context.Context, cfg Config) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.WithDefaults()
	link, err := netlink.LinkByName(cfg.Bridge)
	if isNotFound(err) {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: cfg.Bridge}}
		if err := netlink.LinkAdd(br); err != nil && !errors.Is(err, errExist) {
			return fmt.Errorf("create bridge %s: %w", cfg.Bridge, err)
		}
		link, err = netlink.LinkByName(cfg.Bridge)
		if err == nil {
			// Mark it as banger's so that people know who made it.
			if err := netlink.LinkSetAlias(link, AliasPrefix+"bridge"); err != nil {
				return fmt.Errorf("set alias on bridge %s: %w", cfg.Bridge, err)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("look up bridge %s: %w", cfg.Bridge, err)
	}
	if link.Type() != "bridge" {
		return fmt.Errorf("bridge %s: a %s link has that name: %w", cfg.Bridge, link.Type(), ErrNameTaken)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{
		IP:   cfg.Gateway().AsSlice(),
		Mask: net.CIDRMask(cfg.Subnet.Bits(), 32),
	}}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("assign %s to bridge %s: %w", addr.IPNet, cfg.Bridge, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up bridge %s: %w", cfg.Bridge, err)
	}
	return nil
}

// CreateTap creates the VM's tap (TapName(vmID)): a persistent tap owned by
// cfg.TapUID and cfg.TapGID (root by default), tagged with TapAlias(vmID), attached to the bridge and up. A
// persistent tap outlives the daemon's file descriptor, so the VM monitor
// opens it by name later. If the tap already exists with the VM's alias it
// is reused (made sure to be attached and up); if a link with that name
// exists without the alias, CreateTap fails with ErrNameTaken and leaves it
// alone. On failure a tap CreateTap made is removed again.
func CreateTap(ctx context.Context, cfg Config, vmID string) (Tap, error) {
	if err := ctx.Err(); err != nil {
		return Tap{}, err
	}
	if err := ValidateVMID(vmID); err != nil {
		return Tap{}, err
	}
	cfg = cfg.WithDefaults()
	name, alias := TapName(vmID), TapAlias(vmID)
	bridge, err := netlink.LinkByName(cfg.Bridge)
	if err != nil {
		return Tap{}, fmt.Errorf("create tap %s: look up bridge %s (run EnsureBridge first): %w", name, cfg.Bridge, err)
	}
	link, err := netlink.LinkByName(name)
	created := false
	switch {
	case isNotFound(err):
		// The tap is made non-persistent with its file descriptor held
		// open, and only made persistent once it carries banger's alias:
		// if the daemon dies in between, the kernel removes the tap with
		// the descriptor, so an untagged tap (which teardown would refuse
		// to delete) can never be left behind.
		tt := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: name},
			Mode:      netlink.TUNTAP_MODE_TAP,
			// TUN_EXCL makes creation fail if another process made the
			// name in between; the VM monitor sets its own NO_PI/VNET_HDR
			// flags when it attaches.
			Flags:      netlink.TUNTAP_TUN_EXCL | netlink.TUNTAP_ONE_QUEUE | netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR,
			NonPersist: true,
			Queues:     1,
			Owner:      cfg.TapUID,
			Group:      cfg.TapGID,
		}
		if err := netlink.LinkAdd(tt); err != nil {
			return Tap{}, fmt.Errorf("create tap %s: %w", name, err)
		}
		defer func() {
			for _, f := range tt.Fds {
				_ = f.Close()
			}
		}()
		created = true
		link, err = netlink.LinkByName(name)
		if err == nil {
			err = netlink.LinkSetAlias(link, alias)
		}
		if err == nil {
			err = persist(tt)
		}
	case err != nil:
		return Tap{}, fmt.Errorf("create tap %s: %w", name, err)
	case link.Attrs().Alias != alias:
		return Tap{}, fmt.Errorf("create tap %s for VM %s: a %s link with alias %q has that name: %w",
			name, vmID, link.Type(), link.Attrs().Alias, ErrNameTaken)
	}
	if err == nil {
		err = netlink.LinkSetMaster(link, bridge)
	}
	if err == nil {
		err = netlink.LinkSetUp(link)
	}
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		if created {
			_ = netlink.LinkDel(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}})
		}
		return Tap{}, fmt.Errorf("set up tap %s: %w", name, err)
	}
	return Tap{Name: name, VMID: vmID, Alias: alias, Index: link.Attrs().Index, Bridge: cfg.Bridge, Up: true}, nil
}

// persist makes the tap outlive the file descriptor LinkAdd left open.
func persist(tt *netlink.Tuntap) error {
	if len(tt.Fds) == 0 {
		return errors.New("no tap file descriptor to make the tap persistent with")
	}
	raw, err := tt.Fds[0].SyscallConn()
	if err != nil {
		return err
	}
	var errno syscall.Errno
	if err := raw.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(unix.TUNSETPERSIST), 1)
	}); err != nil {
		return err
	}
	if errno != 0 {
		return fmt.Errorf("TUNSETPERSIST: %w", errno)
	}
	return nil
}

// DeleteTap deletes the tap named name if, and only if, its alias is
// TapAlias(vmID). A link with any other alias (or none) is left alone and
// ErrNotOurs returned, whatever a stored record claims. A link that does not
// exist counts as deleted.
func DeleteTap(ctx context.Context, name, vmID string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := validIfName(name); err != nil {
		return fmt.Errorf("delete tap: %w", err)
	}
	link, err := netlink.LinkByName(name)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete tap %s: %w", name, err)
	}
	if got, want := link.Attrs().Alias, TapAlias(vmID); got != want || vmID == "" {
		return fmt.Errorf("delete tap %s: its alias is %q, not %q: %w", name, got, want, ErrNotOurs)
	}
	if err := netlink.LinkDel(link); err != nil && !isNotFound(err) && !errors.Is(err, errNoDev) {
		return fmt.Errorf("delete tap %s: %w", name, err)
	}
	return nil
}

// ListTaps returns every link named TapPrefix* whose alias starts with
// AliasPrefix: the taps banger made, for the orphan scan.
func ListTaps(ctx context.Context) ([]Tap, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	var taps []Tap
	for _, l := range links {
		a := l.Attrs()
		if !strings.HasPrefix(a.Name, TapPrefix) || !strings.HasPrefix(a.Alias, AliasPrefix) {
			continue
		}
		taps = append(taps, Tap{
			Name:   a.Name,
			VMID:   strings.TrimPrefix(a.Alias, AliasPrefix),
			Alias:  a.Alias,
			Index:  a.Index,
			Bridge: names[a.MasterIndex],
			Up:     a.Flags&net.FlagUp != 0,
		})
	}
	return taps, nil
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, errNoDev)
}
