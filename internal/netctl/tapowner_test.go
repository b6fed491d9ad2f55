package netctl_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/vishvananda/netlink"
)

// The test binary doubles as a process that attaches to a tap by name, as
// a VM monitor does after dropping privileges (Firecracker under the
// jailer): BANGER_TEST_TAP_ATTACH=<tap>.
func TestMain(m *testing.M) {
	if name := os.Getenv("BANGER_TEST_TAP_ATTACH"); name != "" {
		if err := attachTap(os.Getenv("BANGER_TEST_TUN"), name); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func attachTap(tun, name string) error {
	fd, err := unix.Open(tun, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var req [unix.IFNAMSIZ + 64]byte
	copy(req[:unix.IFNAMSIZ-1], name)
	*(*uint16)(unsafe.Pointer(&req[unix.IFNAMSIZ])) = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req[0]))); errno != 0 {
		return fmt.Errorf("TUNSETIFF %s: %w", name, errno)
	}
	return nil
}

// TestTapOwnedByJailUser: a tap made with TapUID/TapGID can be attached by
// that unprivileged user (as the jailed Firecracker opens its tap), and a
// root-owned tap cannot.
func TestTapOwnedByJailUser(t *testing.T) {
	testutil.InNetNS(t)
	ctx := context.Background()
	// A copy of this test binary that uid 65534 may run (the build dir is
	// private).
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("/tmp", "bnt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	b, err := os.ReadFile(exe) //nolint:gosec // this test binary
	if err != nil {
		t.Fatal(err)
	}
	self := dir + "/netctl.test"
	if err := os.WriteFile(self, b, 0o755); err != nil { //nolint:gosec // an executable for uid 65534
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil { //nolint:gosec // reachable by uid 65534
		t.Fatal(err)
	}
	// The jail user's own /dev/net/tun node, as the jailer makes one in the
	// chroot (the host's may be root's only).
	tun := dir + "/tun"
	if err := unix.Mknod(tun, unix.S_IFCHR|0o600, int(unix.Mkdev(10, 200))); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(tun, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	attachAs := func(tap string) error {
		cmd := exec.Command(self)
		cmd.Env = []string{"BANGER_TEST_TAP_ATTACH=" + tap, "BANGER_TEST_TUN=" + tun}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	if err := netctl.EnsureBridge(ctx, netctl.Config{}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		vm       string
		uid, gid uint32
		ok       bool
	}{{"0123456789abcdef-j1", 65534, 65534, true}, {"0123456789abcdef-r1", 0, 0, false}} {
		tap, err := netctl.CreateTap(ctx, netctl.Config{TapUID: c.uid, TapGID: c.gid}, c.vm)
		if err != nil {
			t.Fatal(err)
		}
		link, err := netlink.LinkByName(tap.Name)
		if err != nil {
			t.Fatal(err)
		}
		if tt, ok := link.(*netlink.Tuntap); !ok || tt.Owner != c.uid || tt.Group != c.gid {
			t.Errorf("tap %s: %+v, want owner %d group %d", tap.Name, link, c.uid, c.gid)
		}
		err = attachAs(tap.Name)
		if c.ok && err != nil {
			t.Errorf("uid 65534 cannot attach to its own tap %s: %v", tap.Name, err)
		}
		if !c.ok && (err == nil || !strings.Contains(err.Error(), "operation not permitted")) {
			t.Errorf("uid 65534 attaching to root's tap %s: %v, want EPERM", tap.Name, err)
		}
		if err := netctl.DeleteTap(ctx, tap.Name, c.vm); err != nil {
			t.Fatal(err)
		}
	}
}
