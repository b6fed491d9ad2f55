package imagepull

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
)

// ErrSizeTooSmall is returned when the requested file system size cannot
// hold the image content.
var ErrSizeTooSmall = errors.New("file system size too small for the image")

// ErrE2fsprogs is returned when e2fsprogs is missing or too old.
var ErrE2fsprogs = errors.New("e2fsprogs >= 1.43 is required (install it: apt-get install e2fsprogs)")

const (
	// minSize is the smallest file system DefaultSize picks: 1 GiB.
	minSize = 1 << 30
	// sizeAlign is what sizes are rounded up to: 4 MiB.
	sizeAlign = 4 << 20
	// blockSize is the ext4 block size mkfs.ext4 uses for file systems of
	// 512 MiB and more.
	blockSize = 4096
	// inodeSize is mkfs.ext4's default inode size.
	inodeSize = 256
	// bytesPerInode is mkfs.ext4's default inode_ratio for "default" file
	// systems (mke2fs.conf).
	bytesPerInode = 16384
	// inodeMargin is the fixed number of inodes added on top of twice the
	// entry count, for what the guest installs on first boot.
	inodeMargin = 16384
	// journalReserve is the space CheckSize keeps for the journal and
	// other fixed metadata: mkfs.ext4 gives a 1-8 GiB file system a 64
	// MiB journal at most up to 1 GiB and 128 MiB above; 128 MiB covers
	// the usual sizes.
	journalReserve = 128 << 20
)

// DefaultSize is the file system size for an image whose content is
// contentBytes: content × 1.5, at least 1 GiB, rounded up to 4 MiB. Pass
// DiskUsage(md) as the content: it counts what the files really take.
func DefaultSize(contentBytes int64) int64 {
	if contentBytes < 0 {
		contentBytes = 0
	}
	size := contentBytes + contentBytes/2
	if size < minSize {
		size = minSize
	}
	return roundUp(size, sizeAlign)
}

func roundUp(n, to int64) int64 {
	return (n + to - 1) / to * to
}

// DiskUsage estimates the bytes md needs on ext4, for DefaultSize and
// CheckSize: every regular file rounded up to whole 4 KiB blocks, a block
// per directory, and the inode tables BuildExt4 will make (inodeCount). A
// small-file-heavy image needs far more than the sum of its file sizes: a
// million 100-byte files are 100 MB of content but 4 GiB of blocks.
// Hardlinked paths count once per path, so it may overestimate.
func DiskUsage(md Metadata) int64 {
	var n int64
	for _, m := range md {
		switch m.Type {
		case TypeRegular:
			n += roundUp(m.Size, blockSize)
		case TypeDir:
			n += blockSize
		}
	}
	return n + (2*int64(len(md))+inodeMargin)*inodeSize
}

// CheckSize reports whether a file system of sizeBytes can hold
// contentBytes of files. It keeps 10% of the content for block rounding
// and directories, plus room for the journal and the inode tables; the
// error wraps ErrSizeTooSmall and names the smallest size that passes. It
// is cheap, so callers check a user's --size before any work.
func CheckSize(contentBytes, sizeBytes int64) error {
	if sizeBytes <= 0 {
		return fmt.Errorf("size %d bytes: %w", sizeBytes, ErrSizeTooSmall)
	}
	need := contentBytes + contentBytes/10 + journalReserve + sizeBytes/bytesPerInode*inodeSize
	if sizeBytes < need {
		return fmt.Errorf("size %s for %s of content, need at least %s: %w",
			humanBytes(sizeBytes), humanBytes(contentBytes), humanBytes(roundUp(need, sizeAlign)), ErrSizeTooSmall)
	}
	return nil
}

// stagingUsage is what a staging tree needs on ext4.
type stagingUsage struct {
	entries int64 // every file, directory, link and node
	blocks  int64 // bytes rounded up to blockSize, per regular file and directory
}

// measureStaging walks the staging tree. Hardlinked files are counted once.
func measureStaging(ctx context.Context, dir string) (stagingUsage, error) {
	var u stagingUsage
	seen := map[fileID]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		u.entries++
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case info.Mode().IsRegular():
			if id, ok := inodeID(info); ok {
				if seen[id] {
					return nil
				}
				seen[id] = true
			}
			u.blocks += roundUp(info.Size(), blockSize)
		case info.IsDir():
			u.blocks += blockSize
		}
		return nil
	})
	if err != nil {
		return u, fmt.Errorf("measure staging %q: %w", dir, err)
	}
	return u, nil
}

// fileID identifies an inode of the host file system.
type fileID struct{ dev, ino uint64 }

// inodeID is the identity of a file with more than one link, so that
// hardlinks are counted once.
func inodeID(info fs.FileInfo) (fileID, bool) {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok || st.Nlink < 2 {
		return fileID{}, false
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino}, true //nolint:unconvert // Dev is not uint64 on every platform
}

// inodeCount is the number of inodes BuildExt4 asks for. mkfs.ext4's
// default is one inode per 16 KiB, which a small-file-heavy image (a
// node_modules tree, a Python site-packages, icon themes: many files of a
// few hundred bytes) runs out of long before blocks: mkfs.ext4 -d then
// fails with "Could not allocate inode". So the count is the larger of the
// default and twice the staged entries plus a margin, which leaves the
// guest room to install as many files again. It never exceeds one inode per
// block (mkfs.ext4's own limit).
func inodeCount(sizeBytes, entries int64) int64 {
	n := sizeBytes / bytesPerInode
	if want := 2*entries + inodeMargin; want > n {
		n = want
	}
	if limit := sizeBytes / blockSize; n > limit {
		n = limit
	}
	return n
}

// BuildExt4 makes an ext4 file system of sizeBytes at ext4Path holding the
// tree in stagingDir, with `mkfs.ext4 -d`: no mount, no loop device, no
// privilege. The root directory is owned by 0:0; every other file keeps the
// owner and mode it has in stagingDir until ApplyOwnership restores the
// image's. ext4Path must not exist: BuildExt4 creates it (sparse) and
// removes it again on any failure or cancellation.
//
// Before running mkfs it measures the staging tree and fails with
// ErrSizeTooSmall when sizeBytes cannot hold it. The inode count is chosen
// by inodeCount.
func BuildExt4(ctx context.Context, stagingDir, ext4Path string, sizeBytes int64) (retErr error) {
	if sizeBytes%blockSize != 0 || sizeBytes <= 0 {
		return fmt.Errorf("build ext4 %q: size %d is not a positive multiple of %d", ext4Path, sizeBytes, blockSize)
	}
	st, err := os.Stat(stagingDir)
	if err != nil {
		return fmt.Errorf("build ext4 %q: staging: %w", ext4Path, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("build ext4 %q: staging %q is not a directory", ext4Path, stagingDir)
	}
	u, err := measureStaging(ctx, stagingDir)
	if err != nil {
		return fmt.Errorf("build ext4 %q: %w", ext4Path, err)
	}
	inodes := inodeCount(sizeBytes, u.entries)
	need := u.blocks + u.blocks/20 + journalReserve + inodes*inodeSize
	if sizeBytes < need {
		return fmt.Errorf("build ext4 %q: size %s for %d entries using %s, need at least %s: %w",
			ext4Path, humanBytes(sizeBytes), u.entries, humanBytes(u.blocks), humanBytes(roundUp(need, sizeAlign)), ErrSizeTooSmall)
	}

	// O_EXCL: the file is ours, so removing it on failure is safe.
	f, err := os.OpenFile(ext4Path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("build ext4: create %q: %w", ext4Path, err)
	}
	defer func() {
		if retErr != nil {
			_ = os.Remove(ext4Path)
		}
	}()
	if err := f.Truncate(sizeBytes); err != nil {
		_ = f.Close()
		return fmt.Errorf("build ext4: truncate %q to %d: %w", ext4Path, sizeBytes, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("build ext4: close %q: %w", ext4Path, err)
	}

	args := []string{"-F", "-q", "-b", strconv.Itoa(blockSize),
		"-N", strconv.FormatInt(inodes, 10),
		"-d", stagingDir, "-E", "root_owner=0:0", "--", ext4Path}
	cmd := exec.CommandContext(ctx, "mkfs.ext4", args...) // #nosec G204 -- fixed program, arguments are paths and numbers
	cmd.Env = append(os.Environ(), "LC_ALL=C", "MKE2FS_SYNC=0")
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return fmt.Errorf("build ext4 %q: %w", ext4Path, ctxErr)
		}
		return fmt.Errorf("build ext4 %q: mkfs.ext4 -d %q: %w: %s", ext4Path, stagingDir, err, strings.TrimSpace(out.String()))
	}
	return nil
}

var e2fsVersionRE = regexp.MustCompile(`mke2fs ([0-9]+)\.([0-9]+)(\.[0-9]+)?`)

// CheckE2fsprogs returns the installed e2fsprogs version, or an error
// wrapping ErrE2fsprogs when mkfs.ext4 or debugfs is missing or older than
// 1.43 (the first release with mkfs.ext4 -d).
func CheckE2fsprogs(ctx context.Context) (string, error) {
	for _, prog := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(prog); err != nil {
			return "", fmt.Errorf("%s not found: %w", prog, ErrE2fsprogs)
		}
	}
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-V").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("mkfs.ext4 -V: %w: %s: %w", err, strings.TrimSpace(string(out)), ErrE2fsprogs)
	}
	return parseE2fsVersion(string(out))
}

// parseE2fsVersion reads the version from `mkfs.ext4 -V` output
// ("mke2fs 1.47.0 (5-Feb-2023)") and checks it is at least 1.43.
func parseE2fsVersion(out string) (string, error) {
	m := e2fsVersionRE.FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("cannot read the e2fsprogs version from %q: %w", strings.TrimSpace(out), ErrE2fsprogs)
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	version := m[1] + "." + m[2] + m[3]
	if major < 1 || (major == 1 && minor < 43) {
		return version, fmt.Errorf("found e2fsprogs %s: %w", version, ErrE2fsprogs)
	}
	return version, nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
