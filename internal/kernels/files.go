package kernels

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// cloneOrCopy makes dst a copy of the regular file src: a reflink where the
// file system supports one, a byte copy otherwise. dst must not exist.
func cloneOrCopy(src, dst string, mode os.FileMode) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			_ = os.Remove(dst)
		}
	}()
	if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil {
		return nil
	}
	if _, err := io.Copy(out, in); err != nil {
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return nil
}

// linkOrCopy makes dst the same content as src: a hard link when both are
// on one file system, else a reflink or copy.
func linkOrCopy(src, dst string, mode os.FileMode) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	return cloneOrCopy(src, dst, mode)
}

// copyTree copies the directory tree src to dst (which must not exist),
// regular files and directories only; symlinks and special files are
// skipped (a distro modules dir's build/source links point outside it).
// With link set, files are hard-linked where possible.
func copyTree(src, dst string, link bool) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		if err := checkName(rel); err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.Mkdir(target, 0o755)
		case d.Type().IsRegular():
			info, err := d.Info()
			if err != nil {
				return err
			}
			mode := os.FileMode(0o644)
			if info.Mode()&0o111 != 0 {
				mode = 0o755
			}
			if link {
				return linkOrCopy(p, target, mode)
			}
			return cloneOrCopy(p, target, mode)
		}
		return nil
	})
}

// syncDir flushes the file system holding dir (syncfs) so everything
// written below it is durable before a rename publishes it.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// ErrExists is returned when the destination of an import or pull exists.
var ErrExists = errors.New("already exists")

// newStaging makes the staging directory for dstDir, refusing when dstDir
// exists already.
func newStaging(dstDir string) (string, error) {
	if _, err := os.Lstat(dstDir); err == nil {
		return "", fmt.Errorf("%s: %w", dstDir, ErrExists)
	}
	if err := os.MkdirAll(filepath.Dir(dstDir), 0o755); err != nil {
		return "", err
	}
	return os.MkdirTemp(filepath.Dir(dstDir), filepath.Base(dstDir)+StagingInfix+"*")
}

// StagingInfix marks a directory as an unfinished import or pull:
// "<dstDir>.staging-<random>". RemoveStale deletes them.
const StagingInfix = ".staging-"

// publish syncs staging and renames it to dstDir.
func publish(staging, dstDir string) error {
	if err := syncDir(staging); err != nil {
		return err
	}
	if err := os.Rename(staging, dstDir); err != nil {
		if errors.Is(err, fs.ErrExist) || errors.Is(err, unix.ENOTEMPTY) {
			return fmt.Errorf("publish %s: %w", dstDir, ErrExists)
		}
		return fmt.Errorf("publish %s: %w", dstDir, err)
	}
	if d, err := os.Open(filepath.Dir(dstDir)); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}

// RemoveStale deletes the staging directories an interrupted import or
// pull left in kernelsDir. Call it at daemon start-up, before any import runs.
func RemoveStale(kernelsDir string) ([]string, error) {
	ents, err := os.ReadDir(kernelsDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("remove stale kernel staging dirs: %w", err)
	}
	var removed []string
	for _, e := range ents {
		if e.IsDir() && strings.Contains(e.Name(), StagingInfix) {
			p := filepath.Join(kernelsDir, e.Name())
			if err := os.RemoveAll(p); err != nil {
				return removed, fmt.Errorf("remove stale %s: %w", p, err)
			}
			removed = append(removed, p)
		}
	}
	return removed, nil
}

// rebase maps a path inside staging to the same path inside dstDir.
func rebase(p, staging, dstDir string) string {
	if p == "" {
		return ""
	}
	rel, err := filepath.Rel(staging, p)
	if err != nil {
		return p
	}
	return filepath.Join(dstDir, rel)
}
