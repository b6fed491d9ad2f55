package blockdev

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// prepareCopy gives the VM its own copy of the image (reflink or sparse
// copy), grown to opts.SizeBytes. The copy is written under a temporary
// name and renamed into place when complete and flushed, so an existing
// disk file is always whole and is reused as is. With opts.DeferSync (and a
// Syncer) the complete copy is renamed to <disk>.unsynced instead, for the
// caller to flush with FlushInBackground.
func (m *Manager) prepareCopy(ctx context.Context, opts PrepareOptions, driver string) (Disk, error) {
	dst := filepath.Join(opts.VMDir, DiskFileName)
	d := Disk{Driver: driver, Path: dst, COWPath: dst}
	if m.Syncs != nil {
		if err := m.Syncs.Wait(ctx, dst, opts.Waiting); err != nil {
			return Disk{}, fmt.Errorf("prepare disk %s: %w", dst, err)
		}
	}
	if _, err := os.Stat(dst); err == nil {
		if err := m.grow(ctx, dst, opts.SizeBytes); err != nil {
			return Disk{}, err
		}
		return d, nil
	}
	// An unsynced copy that no flush is promoting is not trusted: after a
	// host crash it holds whatever reached the disk. Copy again.
	if err := os.Remove(dst + UnsyncedSuffix); err != nil && !errors.Is(err, os.ErrNotExist) {
		return Disk{}, fmt.Errorf("prepare disk %s: remove an unflushed copy: %w", dst, err)
	}
	if err := opts.Intent(d); err != nil {
		return Disk{}, fmt.Errorf("prepare disk %s: record intent: %w", dst, err)
	}
	tmp := dst + ".partial"
	if err := m.copyTo(ctx, opts.BaseImage, tmp, driver); err != nil {
		_ = os.Remove(tmp)
		return Disk{}, err
	}
	err := m.grow(ctx, tmp, opts.SizeBytes)
	if err == nil && opts.DeferSync && m.Syncs != nil {
		if err = os.Rename(tmp, dst+UnsyncedSuffix); err == nil {
			return d, nil
		}
	}
	if err == nil {
		err = syncFile(tmp)
	}
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err == nil {
		err = syncFile(opts.VMDir)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return Disk{}, fmt.Errorf("prepare disk %s: %w", dst, err)
	}
	return d, nil
}

// FlushInBackground starts the flush of a disk that Prepare left unsynced
// (PrepareOptions.DeferSync) and reports whether there was one. Prepare of
// the same disk waits for it; Teardown cancels it.
func (m *Manager) FlushInBackground(d Disk) bool {
	if m.Syncs == nil || (d.Driver != DriverCopy && d.Driver != DriverReflink) || d.COWPath == "" {
		return false
	}
	if _, err := os.Stat(d.COWPath + UnsyncedSuffix); err != nil {
		return false
	}
	m.Syncs.Start(d.COWPath)
	return true
}

func (m *Manager) copyTo(ctx context.Context, src, dst, driver string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copy image: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("copy image: %w", err)
	}
	defer out.Close()
	if driver == DriverReflink {
		if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err != nil {
			return fmt.Errorf("reflink %s to %s: %w (%w)", src, dst, ErrNotSupported, err)
		}
	} else if err := SparseCopy(ctx, out, in); err != nil {
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return out.Close()
}

// SparseCopy copies src to dst (both at offset 0, dst empty) data extent
// by data extent, found with SEEK_DATA/SEEK_HOLE, so holes in src stay
// holes in dst. Extents are copied in the kernel with copy_file_range,
// falling back to read/write where it is unavailable.
func SparseCopy(ctx context.Context, dst, src *os.File) error {
	st, err := src.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if err := dst.Truncate(size); err != nil {
		return err
	}
	sfd, dfd := int(src.Fd()), int(dst.Fd())
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		data, err := unix.Seek(sfd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("SEEK_DATA at %d: %w", off, err)
		}
		hole, err := unix.Seek(sfd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("SEEK_HOLE at %d: %w", data, err)
		}
		if err := copyRange(ctx, dfd, sfd, dst, src, data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

const copyChunk = 64 << 20 // bounds each syscall so cancellation is prompt

func copyRange(ctx context.Context, dfd, sfd int, dst, src *os.File, off, n int64) error {
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		roff, woff := off, off
		c, err := unix.CopyFileRange(sfd, &roff, dfd, &woff, int(min(n, copyChunk)), 0)
		if err != nil || c == 0 {
			if err != nil && !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EXDEV) &&
				!errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("copy_file_range at %d: %w", off, err)
			}
			// Fall back to a plain copy of the rest of this extent.
			_, err := io.Copy(io.NewOffsetWriter(dst, off), io.NewSectionReader(src, off, n))
			return err
		}
		off += int64(c)
		n -= int64(c)
	}
	return nil
}

// grow extends the ext4 image in file to size bytes: truncate, then
// resize2fs, running e2fsck -fy first when resize2fs asks for it. A file
// already that large is left alone.
func (m *Manager) grow(ctx context.Context, file string, size int64) error {
	st, err := os.Stat(file)
	if err != nil {
		return fmt.Errorf("grow %s: %w", file, err)
	}
	if st.Size() >= size {
		return nil
	}
	if err := os.Truncate(file, size); err != nil {
		return fmt.Errorf("grow %s: %w", file, err)
	}
	return m.resizeFS(ctx, file)
}

// resizeFS grows the ext4 filesystem on dev (a file or block device) to
// fill it.
func (m *Manager) resizeFS(ctx context.Context, dev string) error {
	r := m.runner()
	_, err := r.Run(ctx, nil, "resize2fs", dev)
	if err == nil {
		return nil
	}
	if !strings.Contains(err.Error(), "e2fsck -f") {
		return fmt.Errorf("grow filesystem on %s: %w", dev, err)
	}
	// resize2fs wants a freshly checked filesystem. e2fsck exits 1 when it
	// fixed something, which is fine here.
	if _, err := r.Run(ctx, nil, "e2fsck", "-fy", dev); err != nil && exitCode(err) != 1 {
		return fmt.Errorf("check filesystem on %s before growing it: %w", dev, err)
	}
	if _, err := r.Run(ctx, nil, "resize2fs", dev); err != nil {
		return fmt.Errorf("grow filesystem on %s: %w", dev, err)
	}
	return nil
}

// syncWrites makes Prepare fsync the disk copy and its directory before
// reporting success, so a disk file that exists after a crash is whole.
// Only the benchmark turns it off, to show the cost of the copy alone.
var syncWrites = true

func syncFile(path string) error {
	if !syncWrites {
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// ReflinkSupported reports whether dir's filesystem can clone files
// (FICLONE), by cloning a tiny probe file. The error says why not.
func ReflinkSupported(dir string) (bool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, err
	}
	src, err := os.CreateTemp(dir, ".reflink-probe-*")
	if err != nil {
		return false, err
	}
	defer os.Remove(src.Name())
	defer src.Close()
	if _, err := src.Write(make([]byte, 4096)); err != nil {
		return false, err
	}
	dst, err := os.CreateTemp(dir, ".reflink-probe-*")
	if err != nil {
		return false, err
	}
	defer os.Remove(dst.Name())
	defer dst.Close()
	if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err != nil {
		return false, fmt.Errorf("FICLONE on %s: %w", dir, err)
	}
	return true, nil
}

// DetectDriver picks the disk driver for this host and says why:
// dm-snapshot when /dev/mapper/control exists and dmsetup works, else
// reflink when the state dir's filesystem can clone files, else copy.
func (m *Manager) DetectDriver(ctx context.Context) (driver, reason string) {
	var why []string
	if _, err := os.Stat("/dev/mapper/control"); err != nil {
		why = append(why, "device-mapper unavailable: /dev/mapper/control is absent")
	} else if _, err := m.runner().Run(ctx, nil, "dmsetup", "version"); err != nil {
		why = append(why, "device-mapper unavailable: "+err.Error())
	} else {
		return DriverDMSnapshot, "device-mapper is available"
	}
	if ok, err := ReflinkSupported(m.StateDir); ok {
		return DriverReflink, strings.Join(append(why, "the state dir's filesystem supports reflinks"), "; ")
	} else if err != nil {
		why = append(why, "no reflinks: "+err.Error())
	}
	return DriverCopy, strings.Join(append(why, "using a sparse copy"), "; ")
}
