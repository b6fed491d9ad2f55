package guestinit

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/mountinfo"
)

// systemMounts are the file systems banger's PID 1 mounts, in order.
var systemMounts = []struct {
	fstype, dir string
	flags       uintptr
	data        string
	mode        os.FileMode
}{
	{"proc", "/proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"sysfs", "/sys", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"devtmpfs", "/dev", unix.MS_NOSUID, "mode=0755", 0o755},
	{"devpts", "/dev/pts", unix.MS_NOSUID | unix.MS_NOEXEC, "gid=5,mode=620,ptmxmode=666", 0o755},
	{"tmpfs", "/dev/shm", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
	{"tmpfs", "/run", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", 0o755},
	{"tmpfs", "/tmp", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
}

// mountSystem remounts the root read-write and mounts /proc, /sys, /dev,
// /dev/pts, /dev/shm, /run and /tmp (creating the mount points, which a
// scratch image lacks), skipping what is mounted already (the initramfs
// moves /proc, /sys and /dev over). It also makes the /dev links devtmpfs
// lacks.
func mountSystem() error {
	var errs []error
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT, ""); err != nil {
		errs = append(errs, fmt.Errorf("remount / read-write: %w", err))
	}
	for _, m := range systemMounts {
		if mounted(m.dir) {
			continue
		}
		if err := os.MkdirAll(m.dir, m.mode); err != nil {
			errs = append(errs, fmt.Errorf("create %s: %w", m.dir, err))
			continue
		}
		if err := unix.Mount(m.fstype, m.dir, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, fmt.Errorf("mount %s on %s: %w", m.fstype, m.dir, err))
		}
	}
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
		"/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "pts/ptmx",
	} {
		if _, err := os.Lstat(link); errors.Is(err, os.ErrNotExist) {
			_ = os.Symlink(target, link)
		}
	}
	return errors.Join(errs...)
}

// mounted reports whether dir is a mount point, from /proc/self/mountinfo
// (false while /proc itself is not mounted).
func mounted(dir string) bool {
	return slices.Contains(mountPoints(), dir)
}

// mountPoints lists the mount points in mount order.
func mountPoints() []string {
	ms, err := mountinfo.Read()
	if err != nil {
		return nil
	}
	return mountinfo.Points(ms)
}

// unmountAll unmounts everything but the root, innermost first, then
// remounts the root read-only so the file system is clean at power-off.
func unmountAll() error {
	mps := mountPoints()
	for i := len(mps) - 1; i >= 0; i-- {
		if mps[i] == "/" {
			continue
		}
		if err := unix.Unmount(mps[i], 0); err != nil {
			_ = unix.Unmount(mps[i], unix.MNT_DETACH)
		}
	}
	var err error
	for try := 0; try < 20; try++ {
		if err = unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("remount / read-only: %w", err)
}
