package qemu

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// openKind says how the daemon opens a file QEMU gets as a descriptor.
type openKind int

const (
	openRW     openKind = iota // a disk or device: O_RDWR
	openCopy                   // a kernel or initrd: a sealed read-only memfd copy
	openListen                 // a Unix socket the daemon binds and QEMU accepts on
	openTap                    // a tap device attached through /dev/net/tun
)

// opening is one descriptor of the plan: what to open and how.
type opening struct {
	kind openKind
	path string // file path, socket path or tap name
}

// open opens the plan's files in order (they become QEMU's descriptors 3,
// 4, ...). On error it closes what it opened and removes the sockets it
// bound.
func (p plan) open() (files []*os.File, err error) {
	defer func() {
		if err != nil {
			closeAll(files)
		}
	}()
	for _, o := range p.opens {
		f, err := o.open()
		if err != nil {
			return files, err
		}
		files = append(files, f)
	}
	return files, nil
}

func (o opening) open() (*os.File, error) {
	switch o.kind {
	case openRW:
		f, err := os.OpenFile(o.path, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", o.path, err)
		}
		return f, nil
	case openCopy:
		return memfdCopy(o.path)
	case openListen:
		return listenUnix(o.path)
	case openTap:
		return openTapFD(o.path)
	}
	return nil, fmt.Errorf("unknown opening kind %d", o.kind)
}

// memfdCopy copies path into a sealed memfd. An unprivileged QEMU can
// reopen it through /proc/self/fd (a memfd's inode is open to any user;
// the file itself is only reachable through the descriptor), where it could
// not open banger's kernel files.
func memfdCopy(path string) (*os.File, error) {
	src, err := os.Open(path) //nolint:gosec // a kernel or initrd the daemon chose
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer src.Close()
	fd, err := unix.MemfdCreate("banger-boot", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd for %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), "memfd:"+path)
	if _, err := io.Copy(f, src); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("copy %s into a memfd: %w", path, err)
	}
	if err := sealMemfd(f); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("seal the memfd of %s: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}

// sealMemfd makes f read-only for good. The kernel refuses F_SEAL_WRITE
// with EBUSY while some page of the file has an extra reference after its
// own short wait (page migration, a memory monitor such as DAMON, a splice
// still draining): a transient, so it is tried again for up to a second.
func sealMemfd(f *os.File) error {
	const seals = unix.F_SEAL_WRITE | unix.F_SEAL_GROW | unix.F_SEAL_SHRINK | unix.F_SEAL_SEAL
	deadline := time.Now().Add(time.Second)
	for {
		_, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, seals)
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// listenUnix binds and listens on a Unix stream socket at path (mode 0600,
// the daemon's) and returns the listening descriptor.
func listenUnix(path string) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), "unix:"+path)
	old := unix.Umask(0o177)
	err = unix.Bind(fd, &unix.SockaddrUnix{Name: path})
	unix.Umask(old)
	if err == nil {
		err = unix.Listen(fd, 8)
	}
	if err != nil {
		_ = f.Close()
		_ = os.Remove(path)
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return f, nil
}

// openTapFD attaches to the tap named name (which netctl made, with
// VNET_HDR) and returns the queue's descriptor, so QEMU needs neither
// /dev/net/tun nor CAP_NET_ADMIN.
func openTapFD(name string) (*os.File, error) {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err == nil {
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		err = unix.IoctlIfreq(int(f.Fd()), unix.TUNSETIFF, ifr)
	}
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("attach to tap %s: %w", name, err)
	}
	return f, nil
}

func closeAll(files []*os.File) {
	var errs []error
	for _, f := range files {
		errs = append(errs, f.Close())
	}
	_ = errors.Join(errs...)
}
