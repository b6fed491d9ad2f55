package mounts

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/sys/unix"
)

// resolveBeneath is how every guest path is resolved under the root: no
// step out of it by "..", by an absolute path or by a symlink, and no
// /proc magic links.
const resolveBeneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS

// Root is a host folder opened for serving: every operation resolves its
// path beneath the folder's directory descriptor (openat2 RESOLVE_BENEATH),
// so nothing a guest sends can name a file outside it. A Root runs inside
// the per-mount server process, with the caller's uid and gids: the kernel
// checks every access as the caller.
type Root struct {
	fd       int
	dir      string // the resolved host path, for messages
	readOnly bool
}

// OpenRoot resolves dir's symlinks, opens the folder and checks that the
// calling process may read it (and write it unless readOnly). It must run
// with the caller's credentials: a folder the caller cannot reach is
// refused here, whatever the link that led to it.
func OpenRoot(dir string, readOnly bool) (*Root, error) {
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("host folder %q: %w", dir, ErrNotAbsolute)
	}
	resolved, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, fmt.Errorf("host folder %s: %w", dir, err)
	}
	fd, err := unix.Open(resolved, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("host folder %s (resolved to %s): %w", dir, resolved, err)
	}
	want := uint32(unix.R_OK | unix.X_OK)
	what := "read"
	if !readOnly {
		want |= unix.W_OK
		what = "read and write"
	}
	if err := unix.Faccessat(fd, ".", want, 0); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("host folder %s: you may not %s it (%w): fix its permissions or mount it :ro", resolved, what, err)
	}
	return &Root{fd: fd, dir: resolved, readOnly: readOnly}, nil
}

// Close closes the root descriptor.
func (r *Root) Close() error { return unix.Close(r.fd) }

// Dir is the resolved host path of the folder.
func (r *Root) Dir() string { return r.dir }

// rel turns a cleaned SFTP path ("/a/b") into a path relative to the root.
func rel(p string) (string, error) {
	if strings.IndexByte(p, 0) >= 0 {
		return "", unix.EINVAL
	}
	p = strings.TrimLeft(path.Clean("/"+p), "/")
	if p == "" {
		return ".", nil
	}
	return p, nil
}

// fail wraps a failed operation as an errno the guest side decodes. Every
// error of a folder deleted while mounted becomes EIO.
func (r *Root) fail(op, p string, err error) error {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		errno = unix.EIO
	}
	if errno == unix.EXDEV {
		// RESOLVE_BENEATH refused a path that leaves the folder.
		errno = unix.EACCES
	}
	var st unix.Stat_t
	if unix.Fstat(r.fd, &st) == nil && st.Nlink == 0 {
		errno = unix.EIO
		err = errors.New("the host folder was deleted")
	}
	return &Errno{Op: op, Path: p, Errno: errno, Err: err}
}

// openat2 opens p beneath the root.
// openat2 is strict about flags: O_PATH takes no others, and a mode only
// goes with O_CREAT.
func (r *Root) openat2(p string, flags int, mode uint32) (int, error) {
	flags |= unix.O_CLOEXEC
	if flags&unix.O_PATH == 0 {
		flags |= unix.O_NOCTTY
	}
	if flags&unix.O_CREAT == 0 {
		mode = 0
	}
	return unix.Openat2(r.fd, p, &unix.OpenHow{Flags: uint64(flags), Mode: uint64(mode), Resolve: resolveBeneath})
}

// parent opens p's parent directory beneath the root (O_PATH) and returns
// it with p's last component, which is never ".", ".." or empty.
func (r *Root) parent(p string) (int, string, error) {
	dir, base := path.Split(p)
	if base == "" || base == "." || base == ".." {
		return -1, "", unix.EINVAL
	}
	if dir == "" {
		dir = "."
	}
	fd, err := r.openat2(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return -1, "", err
	}
	return fd, base, nil
}

func (r *Root) writable(op, p string) error {
	if r.readOnly {
		return &Errno{Op: op, Path: p, Errno: unix.EROFS, Err: errors.New("the folder is mounted read-only")}
	}
	return nil
}

// OpenFile opens p with flags (os.O_* values) and creates it with perm.
// Only regular files open: a FIFO or device in the folder is refused
// rather than left to block or reach hardware.
func (r *Root) OpenFile(sftpPath string, flags int, perm uint32) (*os.File, error) {
	p, err := rel(sftpPath)
	if err != nil {
		return nil, r.fail("open", sftpPath, err)
	}
	if flags&(os.O_WRONLY|os.O_RDWR|os.O_CREATE|os.O_TRUNC|os.O_APPEND) != 0 {
		if err := r.writable("open", sftpPath); err != nil {
			return nil, err
		}
	}
	fd, err := r.openat2(p, flags|unix.O_NONBLOCK, perm)
	if err != nil {
		return nil, r.fail("open", sftpPath, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		_ = unix.Close(fd)
		return nil, r.fail("open", sftpPath, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
	case unix.S_IFDIR:
		_ = unix.Close(fd)
		return nil, r.fail("open", sftpPath, unix.EISDIR)
	default:
		_ = unix.Close(fd)
		return nil, r.fail("open", sftpPath, unix.ENXIO)
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		_ = unix.Close(fd)
		return nil, r.fail("open", sftpPath, err)
	}
	return os.NewFile(uintptr(fd), sftpPath), nil
}

// Lstat describes p without following a final symlink.
func (r *Root) Lstat(sftpPath string) (fs.FileInfo, error) {
	p, err := rel(sftpPath)
	if err != nil {
		return nil, r.fail("lstat", sftpPath, err)
	}
	var st unix.Stat_t
	if p == "." {
		err = unix.Fstat(r.fd, &st)
	} else {
		var dfd int
		var base string
		if dfd, base, err = r.parent(p); err == nil {
			err = unix.Fstatat(dfd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
			_ = unix.Close(dfd)
		}
	}
	if err != nil {
		return nil, r.fail("lstat", sftpPath, err)
	}
	return newFileInfo(path.Base("/"+p), &st), nil
}

// Stat describes p, following symlinks that stay inside the folder.
func (r *Root) Stat(sftpPath string) (fs.FileInfo, error) {
	p, err := rel(sftpPath)
	if err != nil {
		return nil, r.fail("stat", sftpPath, err)
	}
	fd, err := r.openat2(p, unix.O_PATH, 0)
	if err != nil {
		return nil, r.fail("stat", sftpPath, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, r.fail("stat", sftpPath, err)
	}
	return newFileInfo(path.Base("/"+p), &st), nil
}

// ReadDir lists the directory p, each entry described without following
// symlinks.
func (r *Root) ReadDir(sftpPath string) ([]fs.FileInfo, error) {
	p, err := rel(sftpPath)
	if err != nil {
		return nil, r.fail("readdir", sftpPath, err)
	}
	fd, err := r.openat2(p, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, r.fail("readdir", sftpPath, err)
	}
	f := os.NewFile(uintptr(fd), sftpPath)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, r.fail("readdir", sftpPath, err)
	}
	out := make([]fs.FileInfo, 0, len(names))
	for _, name := range names {
		var st unix.Stat_t
		if err := unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			continue // removed while listing
		}
		out = append(out, newFileInfo(name, &st))
	}
	return out, nil
}

// Readlink returns a symlink's target as stored (it is only text: following
// it is up to the guest, and the host never follows it out of the folder).
func (r *Root) Readlink(sftpPath string) (string, error) {
	p, err := rel(sftpPath)
	if err != nil {
		return "", r.fail("readlink", sftpPath, err)
	}
	dfd, base, err := r.parent(p)
	if err != nil {
		return "", r.fail("readlink", sftpPath, err)
	}
	defer unix.Close(dfd)
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlinkat(dfd, base, buf)
	if err != nil {
		return "", r.fail("readlink", sftpPath, err)
	}
	return string(buf[:n]), nil
}

// atParent runs fn on p's parent descriptor and last component.
func (r *Root) atParent(op, sftpPath string, fn func(dfd int, base string) error) error {
	if err := r.writable(op, sftpPath); err != nil {
		return err
	}
	p, err := rel(sftpPath)
	if err != nil {
		return r.fail(op, sftpPath, err)
	}
	dfd, base, err := r.parent(p)
	if err != nil {
		return r.fail(op, sftpPath, err)
	}
	defer unix.Close(dfd)
	if err := fn(dfd, base); err != nil {
		return r.fail(op, sftpPath, err)
	}
	return nil
}

// Mkdir makes the directory p.
func (r *Root) Mkdir(sftpPath string, perm uint32) error {
	return r.atParent("mkdir", sftpPath, func(dfd int, base string) error { return unix.Mkdirat(dfd, base, perm) })
}

// Remove unlinks the file p (not a directory).
func (r *Root) Remove(sftpPath string) error {
	return r.atParent("unlink", sftpPath, func(dfd int, base string) error { return unix.Unlinkat(dfd, base, 0) })
}

// Rmdir removes the empty directory p.
func (r *Root) Rmdir(sftpPath string) error {
	return r.atParent("rmdir", sftpPath, func(dfd int, base string) error { return unix.Unlinkat(dfd, base, unix.AT_REMOVEDIR) })
}

// Symlink makes p a symlink to target (stored as given).
func (r *Root) Symlink(target, sftpPath string) error {
	if strings.IndexByte(target, 0) >= 0 {
		return r.fail("symlink", sftpPath, unix.EINVAL)
	}
	return r.atParent("symlink", sftpPath, func(dfd int, base string) error { return unix.Symlinkat(target, dfd, base) })
}

// Rename moves from to to; replace false refuses an existing target.
func (r *Root) Rename(from, to string, replace bool) error {
	return r.atParent("rename", from, func(fdfd int, fbase string) error {
		return r.atParent("rename", to, func(tdfd int, tbase string) error {
			flags := uint(0)
			if !replace {
				flags = unix.RENAME_NOREPLACE
			}
			return unix.Renameat2(fdfd, fbase, tdfd, tbase, flags)
		})
	})
}

// Link makes the hard link to for the file from (a symlink is linked
// itself, never followed).
func (r *Root) Link(from, to string) error {
	return r.atParent("link", from, func(fdfd int, fbase string) error {
		return r.atParent("link", to, func(tdfd int, tbase string) error {
			return unix.Linkat(fdfd, fbase, tdfd, tbase, 0)
		})
	})
}

// SetAttr changes what attrs names on p (following symlinks that stay in
// the folder). It goes through an O_PATH descriptor and its /proc/self/fd
// entry, so the target resolved beneath the root is the one changed.
func (r *Root) SetAttr(sftpPath string, a Attrs) error {
	if err := r.writable("setattr", sftpPath); err != nil {
		return err
	}
	p, err := rel(sftpPath)
	if err != nil {
		return r.fail("setattr", sftpPath, err)
	}
	if a.Size != nil {
		fd, err := r.openat2(p, unix.O_WRONLY|unix.O_NONBLOCK, 0)
		if err != nil {
			return r.fail("truncate", sftpPath, err)
		}
		err = unix.Ftruncate(fd, *a.Size)
		_ = unix.Close(fd)
		if err != nil {
			return r.fail("truncate", sftpPath, err)
		}
	}
	if a.Mode == nil && a.UID == nil && a.Atime == nil {
		return nil
	}
	fd, err := r.openat2(p, unix.O_PATH, 0)
	if err != nil {
		return r.fail("setattr", sftpPath, err)
	}
	defer unix.Close(fd)
	proc := fmt.Sprintf("/proc/self/fd/%d", fd)
	if a.Mode != nil {
		if err := unix.Fchmodat(unix.AT_FDCWD, proc, *a.Mode&0o7777, 0); err != nil {
			return r.fail("chmod", sftpPath, err)
		}
	}
	if a.UID != nil && a.GID != nil {
		if err := unix.Fchownat(unix.AT_FDCWD, proc, int(*a.UID), int(*a.GID), 0); err != nil {
			return r.fail("chown", sftpPath, err)
		}
	}
	if a.Atime != nil && a.Mtime != nil {
		ts := []unix.Timespec{unix.NsecToTimespec(a.Atime.UnixNano()), unix.NsecToTimespec(a.Mtime.UnixNano())}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, proc, ts, 0); err != nil {
			return r.fail("utimes", sftpPath, err)
		}
	}
	return nil
}

// StatFS describes the file system holding the folder.
func (r *Root) StatFS() (*unix.Statfs_t, error) {
	var st unix.Statfs_t
	if err := unix.Fstatfs(r.fd, &st); err != nil {
		return nil, r.fail("statfs", "/", err)
	}
	return &st, nil
}

// Attrs are the attributes SetAttr changes; nil fields stay as they are.
type Attrs struct {
	Size         *int64
	Mode         *uint32
	UID, GID     *uint32
	Atime, Mtime *time.Time
}

// fileInfo is an fs.FileInfo over a stat result; Sys is *syscall.Stat_t
// so the SFTP server sends owners and times.
type fileInfo struct {
	name string
	st   syscall.Stat_t
}

func newFileInfo(name string, st *unix.Stat_t) *fileInfo {
	fi := &fileInfo{name: name}
	fi.st = syscall.Stat_t{
		Dev: st.Dev, Ino: st.Ino, Nlink: st.Nlink, Mode: st.Mode, Uid: st.Uid, Gid: st.Gid,
		Rdev: st.Rdev, Size: st.Size, Blksize: st.Blksize, Blocks: st.Blocks,
		Atim: syscall.Timespec(st.Atim), Mtim: syscall.Timespec(st.Mtim), Ctim: syscall.Timespec(st.Ctim),
	}
	return fi
}

// StatExtension is the extended attribute every file description the
// server sends carries: SFTP v3 has whole-second mtime and atime and no
// ctime, inode or link count, which the guest needs for exact times (make,
// git) and to know when its page cache of a file is still good. Its data
// is "ino nlink mtime_ns ctime_ns atime_ns" in decimal.
const StatExtension = "stat@banger.dev"

// Extended carries StatExtension (pkg/sftp sends it with the attributes).
func (f *fileInfo) Extended() []sftp.StatExtended {
	return []sftp.StatExtended{{ExtType: StatExtension, ExtData: fmt.Sprintf("%d %d %d %d %d",
		f.st.Ino, f.st.Nlink, f.st.Mtim.Nano(), f.st.Ctim.Nano(), f.st.Atim.Nano())}}
}

func (f *fileInfo) Name() string       { return f.name }
func (f *fileInfo) Size() int64        { return f.st.Size }
func (f *fileInfo) ModTime() time.Time { return time.Unix(f.st.Mtim.Unix()) }
func (f *fileInfo) IsDir() bool        { return f.st.Mode&unix.S_IFMT == unix.S_IFDIR }
func (f *fileInfo) Sys() any           { return &f.st }

// Mode converts the stat mode to an fs.FileMode.
func (f *fileInfo) Mode() fs.FileMode {
	m := fs.FileMode(f.st.Mode & 0o777)
	switch f.st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		m |= fs.ModeDir
	case unix.S_IFLNK:
		m |= fs.ModeSymlink
	case unix.S_IFIFO:
		m |= fs.ModeNamedPipe
	case unix.S_IFSOCK:
		m |= fs.ModeSocket
	case unix.S_IFCHR:
		m |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		m |= fs.ModeDevice
	}
	if f.st.Mode&unix.S_ISUID != 0 {
		m |= fs.ModeSetuid
	}
	if f.st.Mode&unix.S_ISGID != 0 {
		m |= fs.ModeSetgid
	}
	if f.st.Mode&unix.S_ISVTX != 0 {
		m |= fs.ModeSticky
	}
	return m
}
