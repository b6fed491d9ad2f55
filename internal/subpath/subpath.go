// Package subpath answers one question the daemon asks before it touches a
// path a record names: is it inside the directory it must be in? It is the
// one path-containment check of the host side (removal of image, kernel and
// VM dirs, and the ownership checks of recovery).
package subpath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Inside reports whether path is strictly inside dir, lexically (after
// cleaning both): dir itself, "..", and anything that climbs out are not.
func Inside(dir, path string) bool {
	rel, err := filepath.Rel(filepath.Clean(dir), filepath.Clean(path))
	return err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel)
}

// InsideResolved is Inside for an absolute path, also trying dir with its
// symlinks resolved: the form the kernel reports loop backing files in. A
// relative or empty path is never inside.
func InsideResolved(dir, path string) bool {
	if path == "" || !filepath.IsAbs(path) {
		return false
	}
	if Inside(dir, path) {
		return true
	}
	r, err := filepath.EvalSymlinks(dir)
	return err == nil && Inside(r, path)
}

// Rebase rewrites path from under dir from to the same place under dir to;
// a path not inside from comes back unchanged.
func Rebase(path, from, to string) string {
	if path == "" || !Inside(from, path) {
		return path
	}
	rel, _ := filepath.Rel(filepath.Clean(from), filepath.Clean(path))
	return filepath.Join(to, rel)
}

// RemoveAll removes path recursively, but only when it is strictly inside
// root: a corrupt record can never make the daemon delete anything else.
// An empty path is nothing to remove.
func RemoveAll(root, path string) error {
	if path == "" {
		return nil
	}
	if !Inside(root, path) {
		return fmt.Errorf("refusing to remove %q: not inside %s", path, root)
	}
	if err := os.RemoveAll(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// DiskUsage returns the bytes allocated to the regular files under dir
// (sparse files count only their data).
func DiskUsage(dir string) int64 {
	var n int64
	_ = filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += allocated(fi)
		}
		return nil
	})
	return n
}

// allocated returns the bytes the file occupies on disk.
func allocated(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
