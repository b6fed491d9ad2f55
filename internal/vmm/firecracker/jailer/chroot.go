package jailer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/mountinfo"
	"github.com/bangerdev/banger/internal/privdir"
	"github.com/bangerdev/banger/internal/vmm"
)

// Paths as the jailed Firecracker sees them (inside the chroot). The
// daemon reaches the same files at HostPath.
const (
	KernelPath  = "/kernel/vmlinuz"
	InitrdPath  = "/kernel/initrd"
	DiskName    = "rootfs.disk" // relative to Firecracker's cwd, the chroot's /, as snapshots record it
	RunDir      = "/run"
	APISocket   = "/run/fc.sock"
	AgentSocket = "/run/agent.sock"
)

// MarkerName is the intent record in JailDir, written before anything
// else is made there: it proves the jail is banger's and says how to
// undo what Prepare changed.
const MarkerName = "banger-jail.json"

// marker is the content of MarkerName.
type marker struct {
	ID string `json:"id"`
	// DiskUID and DiskGID are the disk file's owner before Prepare gave it
	// to the jail user (the link shares the inode); Remove restores them.
	DiskUID *uint32 `json:"disk_uid,omitempty"`
	DiskGID *uint32 `json:"disk_gid,omitempty"`
}

// HostPath is where the daemon finds p, a path inside the chroot.
func (inv Invocation) HostPath(p string) string { return filepath.Join(inv.ChrootDir(), p) }

// Prepare builds the jail's chroot before the jailer runs: the marker
// first, then <chroot>/kernel/ with the kernel and initrd (hard links
// when the jail user may read them, else private copies it owns),
// <chroot>/rootfs.disk (a hard link to a disk file, or a block device node
// of the same device, owned by the jail user: Firecracker opens it
// read-write), and <chroot>/run/ (the jail user's, for the sockets). Base
// and <base>/<exec-file-name> are private dirs of the daemon. A disk file
// must be on the chroot base's file system (a link, not a copy: the guest
// writes to it). A jail left by an earlier run of the same VM is removed
// first. On error Prepare removes what it made.
func Prepare(inv Invocation, kernel, initrd, disk string) (err error) {
	if err := inv.Validate(); err != nil {
		return err
	}
	fail := func(format string, a ...any) error {
		return fmt.Errorf("prepare jail %s: %w", inv.JailDir(), fmt.Errorf(format, a...))
	}
	if err := privdir.Ensure(inv.Base()); err != nil {
		return fail("%w", err)
	}
	if err := privdir.Ensure(filepath.Join(inv.Base(), inv.ExecName())); err != nil {
		return fail("%w", err)
	}
	if err := Remove(inv); err != nil {
		return err
	}
	if err := os.Mkdir(inv.JailDir(), 0o700); err != nil {
		return fail("%w", err)
	}
	m := marker{ID: inv.ID}
	if err := writeMarker(inv, m); err != nil {
		_ = os.Remove(inv.JailDir())
		return fail("%w", err)
	}
	defer func() {
		if err != nil {
			_ = Remove(inv)
		}
	}()
	root := inv.ChrootDir()
	for _, d := range []string{root, filepath.Join(root, "kernel"), inv.HostPath(RunDir)} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return fail("%w", err)
		}
	}
	if err := os.Chmod(filepath.Join(root, "kernel"), 0o755); err != nil { //nolint:gosec // the jail user reads the kernel files
		return fail("%w", err)
	}
	if err := os.Chown(inv.HostPath(RunDir), int(inv.UID), int(inv.GID)); err != nil {
		return fail("%w", err)
	}
	if err := linkReadable(kernel, inv.HostPath(KernelPath), inv); err != nil {
		return fail("kernel: %w", err)
	}
	if initrd != "" {
		if err := linkReadable(initrd, inv.HostPath(InitrdPath), inv); err != nil {
			return fail("initrd: %w", err)
		}
	}
	if disk != "" {
		src, err := filepath.EvalSymlinks(disk)
		if err != nil {
			return fail("disk: %w", err)
		}
		fi, err := os.Stat(src)
		if err != nil {
			return fail("disk: %w", err)
		}
		dst := inv.HostPath(DiskName)
		st := fi.Sys().(*syscall.Stat_t)
		switch fi.Mode().Type() {
		case 0:
			// Record the owner before changing it (intent first).
			uid, gid := st.Uid, st.Gid
			m.DiskUID, m.DiskGID = &uid, &gid
			if err := writeMarker(inv, m); err != nil {
				return fail("%w", err)
			}
			if err := os.Link(src, dst); err != nil {
				if errors.Is(err, unix.EXDEV) {
					return fail("disk %s is on another file system than the chroot base %s: put the jailer's chroot base on banger's state file system", src, inv.Base())
				}
				return fail("link disk: %w", err)
			}
		case fs.ModeDevice:
			if err := unix.Mknod(dst, unix.S_IFBLK|0o600, int(st.Rdev)); err != nil {
				return fail("disk device node: %w", err)
			}
		default:
			return fail("disk %s is neither a file nor a block device", src)
		}
		if err := os.Lchown(dst, int(inv.UID), int(inv.GID)); err != nil {
			return fail("%w", err)
		}
	}
	return nil
}

// linkReadable puts src at dst for the jail user to read: a hard link when
// src is a world-readable regular file on the same file system, else a copy
// (mode 0400, owned by the jail user).
func linkReadable(src, dst string, inv Invocation) error {
	src, err := filepath.EvalSymlinks(src)
	if err != nil {
		return err
	}
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", src)
	}
	if fi.Mode().Perm()&0o004 != 0 && os.Link(src, dst) == nil {
		return nil
	}
	in, err := os.Open(src) //nolint:gosec // a kernel file the daemon chose
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o400)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chown(dst, int(inv.UID), int(inv.GID))
}

func writeMarker(inv Invocation, m marker) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	p := filepath.Join(inv.JailDir(), MarkerName)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// readMarker reads the jail's marker; it must name inv.ID.
func readMarker(inv Invocation) (marker, error) {
	var m marker
	b, err := privdir.ReadFile(filepath.Join(inv.JailDir(), MarkerName), 4096)
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("jail marker %s: %w", filepath.Join(inv.JailDir(), MarkerName), err)
	}
	if m.ID != inv.ID {
		return m, fmt.Errorf("jail marker %s names %q, not %q", filepath.Join(inv.JailDir(), MarkerName), m.ID, inv.ID)
	}
	return m, nil
}

// ErrNotBangers marks a jail dir Remove refuses: no marker of banger's
// naming the id, or not a private dir of the daemon.
var ErrNotBangers = errors.New("not provably banger's")

// Remove tears the jail of inv down, after its Firecracker is gone: the
// disk file gets its owner back, JailDir goes (without following a link or
// leaving the file system: the chroot's links and nodes are unlinked, the
// VM's disk stays), and so do the VM's cgroups (<root>/<parent>/<id> under
// every cgroup mount, then the parent when it is empty). A missing jail is
// fine; a dir without banger's marker is refused (ErrNotBangers), touched
// in no way.
func Remove(inv Invocation) error {
	dir := inv.JailDir()
	fi, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return removeCgroups(inv)
	}
	if err != nil {
		return fmt.Errorf("remove jail: %w", err)
	}
	if err := privdir.Check(dir); err != nil {
		return fmt.Errorf("remove jail %s: %w (%w)", dir, ErrNotBangers, err)
	}
	bfi, err := os.Lstat(inv.Base())
	if err != nil {
		return fmt.Errorf("remove jail: %w", err)
	}
	if fi.Sys().(*syscall.Stat_t).Dev != bfi.Sys().(*syscall.Stat_t).Dev {
		return fmt.Errorf("remove jail %s: on another file system than %s: %w", dir, inv.Base(), ErrNotBangers)
	}
	m, err := readMarker(inv)
	if errors.Is(err, fs.ErrNotExist) {
		// Prepare died between the dir and its marker: an empty dir is
		// removed (rmdir removes nothing else); anything more is refused.
		if unix.Rmdir(dir) == nil {
			return removeCgroups(inv)
		}
	}
	if err != nil {
		return fmt.Errorf("remove jail %s: %w (%w)", dir, ErrNotBangers, err)
	}
	if m.DiskUID != nil && m.DiskGID != nil {
		disk := inv.HostPath(DiskName)
		if dfi, err := os.Lstat(disk); err == nil && dfi.Mode().IsRegular() && dfi.Sys().(*syscall.Stat_t).Nlink > 1 {
			if err := os.Lchown(disk, int(*m.DiskUID), int(*m.DiskGID)); err != nil {
				return fmt.Errorf("remove jail: give the disk back: %w", err)
			}
		}
	}
	// os.RemoveAll walks with openat(O_NOFOLLOW) and unlinkat: a link the
	// jail user planted is unlinked, never followed. The jail user cannot
	// mount, so the tree is one file system.
	if err := os.RemoveAll(inv.ChrootDir()); err != nil {
		return fmt.Errorf("remove jail: %w", err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove jail: %w", err)
	}
	return removeCgroups(inv)
}

// CgroupMounts lists the mount points of cgroup (v1) or cgroup2 (v2) file
// systems, from /proc/self/mountinfo.
func CgroupMounts(version int) ([]string, error) {
	ms, err := mountinfo.Read()
	if err != nil {
		return nil, err
	}
	want := "cgroup"
	if version == 2 {
		want = "cgroup2"
	}
	var out []string
	for _, m := range ms {
		if m.FSType == want {
			out = append(out, m.Point)
		}
	}
	return out, nil
}

// removeCgroups removes <mount>/<parent>/<id> under every cgroup mount of
// either version, and the parent when it is empty (another VM's cgroup
// keeps it). rmdir removes only an empty cgroup: one that still holds a
// process is an error.
func removeCgroups(inv Invocation) error {
	var errs []error
	for _, v := range []int{1, 2} {
		mounts, err := CgroupMounts(v)
		if err != nil {
			return err
		}
		for _, mnt := range mounts {
			parent := filepath.Join(mnt, inv.Parent())
			if err := rmdirCgroup(filepath.Join(parent, inv.ID)); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", filepath.Join(parent, inv.ID), err))
				continue
			}
			if inv.Parent() == ParentCgroup {
				_ = unix.Rmdir(parent) // ENOTEMPTY or EBUSY: other VMs
			}
		}
	}
	return errors.Join(errs...)
}

// rmdirCgroup removes an empty cgroup. A monitor that has just died may
// still be a zombie its reaper has not waited for, and a zombie keeps its
// cgroup busy: EBUSY is retried for up to 3 s.
func rmdirCgroup(dir string) error {
	deadline := time.Now().Add(3 * time.Second)
	for {
		err := unix.Rmdir(dir)
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stale removes the jails under base that keep does not claim, at daemon
// start-up: in each <base>/<exec-file-name> dir (a name with
// "firecracker" in it), every jail must be a private dir named by a valid
// id and hold banger's marker naming that id; anything else is left alone
// and reported in refused.
func Stale(base string, keep func(id string) bool) (removed []string, refused []error) {
	if err := privdir.Check(base); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, []error{err}
	}
	execs, err := os.ReadDir(base)
	if err != nil {
		return nil, []error{err}
	}
	for _, x := range execs {
		execName := x.Name()
		dir := filepath.Join(base, execName)
		if !strings.Contains(execName, "firecracker") {
			refused = append(refused, fmt.Errorf("%s: not a jailer dir: %w", dir, ErrNotBangers))
			continue
		}
		if err := privdir.Check(dir); err != nil {
			refused = append(refused, err)
			continue
		}
		ents, err := os.ReadDir(dir)
		if err != nil {
			refused = append(refused, err)
			continue
		}
		for _, e := range ents {
			id := e.Name()
			if !ValidID(id) {
				refused = append(refused, fmt.Errorf("jail %s: not a jailer id: %w", filepath.Join(dir, id), ErrNotBangers))
				continue
			}
			if keep(id) {
				continue
			}
			inv := Invocation{ID: id, ExecFile: "/" + execName, ChrootBase: base, ParentCgroup: ParentCgroup}
			if _, err := readMarker(inv); err == nil {
				KillInside(inv.ChrootDir()) // an orphan monitor
			}
			if err := Remove(inv); err != nil {
				refused = append(refused, err)
				continue
			}
			removed = append(removed, id)
		}
	}
	return removed, refused
}

// RootIs reports whether pid's root directory is dir (same device and
// inode: the path a process in another mount namespace shows is not
// comparable).
func RootIs(pid int, dir string) bool {
	var a, b syscall.Stat_t
	if syscall.Stat("/proc/"+strconv.Itoa(pid)+"/root/", &a) != nil || syscall.Stat(dir, &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// InUse reports whether any process has dir as its root.
func InUse(dir string) bool {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return false
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return true // cannot tell: keep the jail
	}
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && RootIs(pid, dir) {
			return true
		}
	}
	return false
}

// KillInside SIGKILLs every process whose root is dir (provably the jail's:
// nothing else runs chrooted there) and waits for each to go.
func KillInside(dir string) {
	if _, err := os.Lstat(dir); err != nil {
		return
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !RootIs(pid, dir) {
			continue
		}
		h, err := vmm.Identify(pid)
		if err != nil || !RootIs(pid, dir) {
			continue
		}
		if vmm.Signal(h, syscall.SIGKILL) == nil {
			vmm.WaitGone(context.Background(), h, 10*time.Second)
		}
	}
}
