package snapshot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/vmm"
)

// CopiedByReflink is what CopyDisk answers when it made a reflink.
const CopiedByReflink = "reflink"

// CopyDisk copies the disk file src to dst, which must not exist: a
// reflink (FICLONE) where the filesystem shares extents, else a sparse
// copy (holes stay holes). It says which (CopiedByReflink or why not). dst is synced; on error it is
// removed. dm-snapshot is not used: it needs device-mapper, which a host
// may lack, and a snapshot's disk must outlive the VM's devices.
func CopyDisk(ctx context.Context, src, dst string) (how string, err error) {
	return copyDisk(ctx, src, dst, true)
}

// CopyDiskUnflushed is CopyDisk without the flush of dst: the copy is
// whole in the page cache only. The caller marks it first
// (blockdev.MarkUnflushed) and flushes it later (blockdev.Syncer.Flush).
func CopyDiskUnflushed(ctx context.Context, src, dst string) (how string, err error) {
	return copyDisk(ctx, src, dst, false)
}

func copyDisk(ctx context.Context, src, dst string, flush bool) (how string, err error) {
	if src == "" {
		return "", errNoDisk
	}
	in, err := os.Open(src) //nolint:gosec // the VM's own disk, named by the daemon
	if err != nil {
		return "", fmt.Errorf("copy disk: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY|unix.O_CLOEXEC, 0o600) //nolint:gosec // a path under the state dir
	if err != nil {
		return "", fmt.Errorf("copy disk: %w", err)
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("copy disk: %w", cerr)
		}
		if err != nil {
			_ = os.Remove(dst)
		}
	}()
	how = CopiedByReflink
	if rerr := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); rerr != nil {
		how = "sparse copy (no reflink: " + rerr.Error() + ")"
		if err := blockdev.SparseCopy(ctx, out, in); err != nil {
			return "", fmt.Errorf("copy disk %s to %s: %w", src, dst, err)
		}
	}
	if !flush {
		return how, nil
	}
	if err := out.Sync(); err != nil {
		return "", fmt.Errorf("copy disk: sync %s: %w", dst, err)
	}
	return how, nil
}

// hashChunk is the unit of fileSHA256.
const hashChunk = 1 << 20

// fileSHA256 returns a SHA-256 tree hash of a file's content: the SHA-256
// of the SHA-256 of each 1 MiB chunk in order (the last may be shorter).
// It depends only on the bytes, not on how they are stored, but a chunk
// that lies wholly in a hole (SEEK_DATA finds no data in it) is not read:
// its digest is that of zeros. A mostly empty disk is therefore checked in
// the time its data takes.
func fileSHA256(ctx context.Context, path string) (string, error) {
	f, err := os.Open(path) //nolint:gosec // a snapshot file under the state dir
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	size := fi.Size()
	zeros := map[int64][sha256.Size]byte{}
	zeroSum := func(n int64) [sha256.Size]byte {
		if d, ok := zeros[n]; ok {
			return d
		}
		d := sha256.Sum256(make([]byte, n))
		zeros[n] = d
		return d
	}
	tree := sha256.New()
	buf := make([]byte, hashChunk)
	fd := int(f.Fd())
	nextData := int64(0) // no data before this offset
	for off := int64(0); off < size; off += hashChunk {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n := min(hashChunk, size-off)
		if nextData < off+n {
			d, err := unix.Seek(fd, off, unix.SEEK_DATA)
			switch {
			case errors.Is(err, unix.ENXIO):
				nextData = size // only a hole is left
			case err != nil:
				nextData = off // no hole support: read everything
			default:
				nextData = d
			}
		}
		if nextData >= off+n {
			d := zeroSum(n)
			tree.Write(d[:])
			continue
		}
		if _, err := f.ReadAt(buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("checksum %s: %w", path, err)
		}
		d := sha256.Sum256(buf[:n])
		tree.Write(d[:])
	}
	return hex.EncodeToString(tree.Sum(nil)), nil
}

// Verify checks every file of snap against its recorded size and SHA-256.
// The error names the first file that fails and wraps ErrCorrupt.
func (s *Store) Verify(ctx context.Context, snap Snapshot) error {
	if len(snap.Files) == 0 {
		return fmt.Errorf("snapshot %q records no files: %w", snap.Name, ErrCorrupt)
	}
	dir := s.dir(snap.ID)
	for _, f := range snap.Files {
		if f.Name != filepath.Base(f.Name) || f.Name == RecordName || strings.HasPrefix(f.Name, ".") {
			return fmt.Errorf("snapshot %q: file name %q: %w", snap.Name, f.Name, ErrCorrupt)
		}
		p := filepath.Join(dir, f.Name)
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("snapshot %q: %w (%w)", snap.Name, err, ErrCorrupt)
		}
		if fi.Size() != f.Size {
			return fmt.Errorf("snapshot %q: %s is %d bytes, %d were saved (banger snapshot rm it and take it again): %w",
				snap.Name, f.Name, fi.Size(), f.Size, ErrCorrupt)
		}
		stamp, stamped := stampOf(fi)
		if stamped && s.verifiedAs(p, stamp, f.SHA256) {
			continue
		}
		sum, err := fileSHA256(ctx, p)
		if err != nil {
			return fmt.Errorf("snapshot %q: %w", snap.Name, err)
		}
		if sum == f.SHA256 && stamped {
			s.markVerified(p, stamp, sum)
		}
		if sum != f.SHA256 {
			return fmt.Errorf("snapshot %q: %s has SHA-256 %s, %s was saved: the file changed or is damaged (banger snapshot rm it and take it again): %w",
				snap.Name, f.Name, sum[:12], f.SHA256[:min(12, len(f.SHA256))], ErrCorrupt)
		}
	}
	return nil
}

// fileStamp identifies one version of a file: any write through the
// filesystem changes its ctime, a replacement its inode.
type fileStamp struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64
}

func statStamp(path string) (fileStamp, bool) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, false
	}
	return stampOf(fi)
}

func stampOf(fi os.FileInfo) (fileStamp, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileStamp{}, false
	}
	return fileStamp{dev: st.Dev, ino: st.Ino, size: st.Size,
		mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}, true
}

// verifiedAs reports whether path was verified, unchanged since, with sum.
// Verify hashes a file again whenever it changed; each daemon start
// hashes every file once (the cache is in memory), which also catches
// damage that bypassed the filesystem.
func (s *Store) verifiedAs(path string, st fileStamp, sum string) bool {
	s.vmu.Lock()
	defer s.vmu.Unlock()
	v, ok := s.verified[path]
	return ok && v.stamp == st && v.sum == sum
}

func (s *Store) markVerified(path string, st fileStamp, sum string) {
	s.vmu.Lock()
	defer s.vmu.Unlock()
	if s.verified == nil {
		s.verified = map[string]verifiedFile{}
	}
	s.verified[path] = verifiedFile{stamp: st, sum: sum}
}

type verifiedFile struct {
	stamp fileStamp
	sum   string
}

// HostCPUFeatures is a digest of this host's CPU feature flags (the first
// "flags" line of /proc/cpuinfo, sorted), as recorded in Machine.CPUFeatures.
func HostCPUFeatures() (string, error) {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "", fmt.Errorf("cpu features: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		flags := strings.Fields(v)
		sort.Strings(flags)
		sum := sha256.Sum256([]byte(strings.Join(flags, " ")))
		return hex.EncodeToString(sum[:]), nil
	}
	return "", errors.New("cpu features: no flags line in /proc/cpuinfo")
}

// CheckHost refuses a snapshot this host cannot restore: one made by
// another VM monitor or another version of it, or under KVM on a CPU with
// other features (the guest saw the host CPU). m is the backend named
// monitor that would run the restore.
func CheckHost(ctx context.Context, snap Snapshot, monitor string, m vmm.Snapshotter) error {
	if monitor != snap.Machine.Monitor {
		return fmt.Errorf("snapshot %q was made by VM monitor %s; this VM would run under %s (restore it with --vmm %s): %w",
			snap.Name, snap.Machine.Monitor, monitor, snap.Machine.Monitor, ErrIncompatible)
	}
	v, err := m.Version(ctx)
	if err != nil {
		return fmt.Errorf("snapshot %q: %w", snap.Name, err)
	}
	if v != snap.Machine.MonitorVersion {
		return fmt.Errorf("snapshot %q was made by %s; this host has %s, which may not load its state: %w",
			snap.Name, snap.Machine.MonitorVersion, v, ErrIncompatible)
	}
	if snap.Machine.Accel == "kvm" {
		cpu, err := HostCPUFeatures()
		if err != nil {
			return err
		}
		if cpu != snap.Machine.CPUFeatures {
			return fmt.Errorf("snapshot %q was made under KVM on a CPU with other features than this host's: %w", snap.Name, ErrIncompatible)
		}
	}
	return nil
}
