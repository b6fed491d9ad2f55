// Package privdir keeps the daemon's private files where no other user can
// reach them: a directory owned by the daemon's own uid (root, for the
// system daemon) that no group or other user may write, and files in it
// opened without following symlinks and checked after opening.
//
// A world-writable directory such as /run/lock or $TMPDIR lets any local
// user plant a symlink (root then creates or truncates a file where the
// planter chose), a FIFO (a read hangs), a link to /dev/zero (a read never
// ends) or a file it holds a lock on (every user of the lock waits). Files
// under a private directory cannot be planted, and the checks here refuse
// them anyway, so a misconfigured directory fails loudly instead of being
// trusted.
package privdir

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrUnsafe marks a directory or file another user could have planted or
// could change. Test with errors.Is.
var ErrUnsafe = errors.New("not private to the daemon")

// Ensure creates dir (mode 0700) when it is missing and checks that it is
// private: a real directory (not a symlink), owned by this process's euid,
// and not writable by its group or by others. Parents must exist or are
// created 0755; they are the configured state and runtime dirs, root's own.
func Ensure(dir string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil { //nolint:gosec // the parent is a configured, root-owned dir
		return fmt.Errorf("private dir %s: %w", dir, err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("private dir %s: %w", dir, err)
	}
	return Check(dir)
}

// Check reports (wrapping ErrUnsafe) when dir is not a private directory
// of this process's euid. See Ensure.
func Check(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("private dir %s: %w", dir, err)
	}
	return checkInfo(dir, fi, true)
}

func checkInfo(path string, fi fs.FileInfo, wantDir bool) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: no owner information", path)
	}
	euid := os.Geteuid()
	kind := "file"
	switch {
	case wantDir && !fi.IsDir():
		return fmt.Errorf("private dir %s is a %v, not a directory: remove it and retry: %w", path, fi.Mode().Type(), ErrUnsafe)
	case !wantDir && !fi.Mode().IsRegular():
		return fmt.Errorf("private file %s is a %v, not a regular file: remove it and retry: %w", path, fi.Mode().Type(), ErrUnsafe)
	case wantDir:
		kind = "dir"
	}
	if int(st.Uid) != euid {
		return fmt.Errorf("private %s %s is owned by uid %d, not %d: remove it (or chown it) and retry: %w", kind, path, st.Uid, euid, ErrUnsafe)
	}
	if wantDir && fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("private dir %s has mode %v, writable by other users: chmod go-w it and retry: %w", path, fi.Mode().Perm(), ErrUnsafe)
	}
	return nil
}

// OpenFile opens (or, with os.O_CREATE, creates with perm) the regular file
// path inside a private directory (see Ensure). It never follows a symlink,
// never blocks on a FIFO, and refuses anything that is not a regular file
// owned by this process's euid.
func OpenFile(path string, flag int, perm os.FileMode) (*os.File, error) {
	if err := Ensure(filepath.Dir(path)); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, flag|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, perm)
	if errors.Is(err, unix.ELOOP) {
		return nil, fmt.Errorf("private file %s is a symlink: remove it and retry: %w", path, ErrUnsafe)
	}
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err == nil {
		err = checkInfo(path, fi, false)
	}
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}

// ReadFile reads a private file (see OpenFile) of at most max bytes; a
// longer file is an error, so a hostile or corrupt file cannot exhaust
// memory.
func ReadFile(path string, max int64) ([]byte, error) {
	f, err := OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("private file %s is longer than %d bytes: %w", path, max, ErrUnsafe)
	}
	return b, nil
}

// MkdirTemp makes a new directory (mode 0700) named pattern with a random
// part, inside the private directory dir, which it ensures first.
func MkdirTemp(dir, pattern string) (string, error) {
	if err := Ensure(dir); err != nil {
		return "", err
	}
	return os.MkdirTemp(dir, pattern)
}
