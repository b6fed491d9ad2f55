package imagecat

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/progress"
)

// Bundle member names. A bundle holds MemberMetadata first, then
// MemberRootFS, then optionally MemberKernel and MemberInitrd.
const (
	MemberMetadata = "metadata.json"
	MemberRootFS   = "rootfs.ext4"
	MemberKernel   = "kernel"
	MemberInitrd   = "initrd"
)

// BundleMagic starts the decompressed stream of every bundle of this format.
const BundleMagic = "banger-bundle/1\n"

// Limits a bundle must stay within; they bound what an untrusted (if
// sha256-verified) bundle can make Unpack allocate and write.
const (
	maxHeaderBytes   = 48 << 20 // one member header (its extent list)
	maxExtents       = 1 << 20  // extents of one member
	maxMetadataBytes = 1 << 20
	maxRootFSBytes   = 1 << 40
	maxKernelBytes   = 512 << 20
	maxInitrdBytes   = 2 << 30
	maxMembers       = 8
)

// extentBlock is the granularity at which WriteBundle finds holes: a 4 KiB
// block of zeros is left out of the bundle and stays a hole when unpacked.
const extentBlock = 4096

// Metadata is the bundle's metadata.json.
type Metadata struct {
	Schema      int    `json:"schema"`
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	OS          OS     `json:"os"`
	// KernelRef is the kernel the image was built for, as in the index.
	KernelRef string `json:"kernel_ref,omitempty"`
	// Kernel describes the kernel member; nil when the bundle has none.
	Kernel *KernelInfo `json:"kernel,omitempty"`
	// RootFSSize is the apparent size of rootfs.ext4 in bytes.
	RootFSSize int64 `json:"rootfs_size"`
	// Created is when the bundle was built.
	Created time.Time `json:"created"`
	// Builder says how the bundle was made, e.g. "mmdebstrap bookworm".
	Builder string `json:"builder,omitempty"`
}

// KernelInfo describes a kernel carried in a bundle. Its modules, if any,
// are inside rootfs.ext4 already (lib/modules/<Version>).
type KernelInfo struct {
	Version string `json:"version"`
	Format  string `json:"format,omitempty"` // "bzImage" or "vmlinux"
}

// Validate checks the metadata's fields.
func (m *Metadata) Validate() error {
	if m.Schema != SchemaVersion {
		return fmt.Errorf("metadata schema %d, this banger reads %d: %w", m.Schema, SchemaVersion, ErrBadBundle)
	}
	e := Entry{Name: m.Name, Description: m.Description, OS: m.OS, KernelRef: m.KernelRef,
		Bundle: File{URL: "-", SHA256: string(bytes.Repeat([]byte("0"), 64)), Size: 1}}
	if err := e.Validate(); err != nil {
		return fmt.Errorf("metadata: %w: %w", ErrBadBundle, err)
	}
	if m.RootFSSize <= 0 || m.RootFSSize > maxRootFSBytes || m.RootFSSize%extentBlock != 0 {
		return fmt.Errorf("metadata: rootfs size %d: %w", m.RootFSSize, ErrBadBundle)
	}
	if m.Kernel != nil && !osVerRE.MatchString(m.Kernel.Version) {
		return fmt.Errorf("metadata: kernel version %q: %w", m.Kernel.Version, ErrBadBundle)
	}
	if err := checkText(m.Builder); err != nil {
		return fmt.Errorf("metadata: builder: %w: %w", err, ErrBadBundle)
	}
	return nil
}

// memberHeader precedes each member's data in the stream. Extents are
// [offset, length] pairs, ascending and disjoint; the data that follows is
// their bytes, in order. Everything outside them is a hole (zeros).
type memberHeader struct {
	Name    string     `json:"name,omitempty"`
	Size    int64      `json:"size,omitempty"`
	Extents [][2]int64 `json:"extents,omitempty"`
	End     bool       `json:"end,omitempty"`     // the end record
	Members int        `json:"members,omitempty"` // in the end record: members before it
}

// BundleInput is what WriteBundle packs.
type BundleInput struct {
	Metadata Metadata
	RootFS   string // path of the ext4 image
	Kernel   string // optional kernel image
	Initrd   string // optional initrd; needs Kernel
}

// WriteOptions tune WriteBundle.
type WriteOptions struct {
	// Level is the zstd level; zero means zstd.SpeedBetterCompression.
	Level zstd.EncoderLevel
	// Progress receives "bundle" events.
	Progress progress.Func
}

// WriteBundle writes in as a bundle to w. Metadata.RootFSSize is set from
// the file. The rootfs is scanned for data (SEEK_DATA/SEEK_HOLE, then
// zero 4 KiB blocks inside the data): only data extents are stored.
func WriteBundle(ctx context.Context, w io.Writer, in BundleInput, opts WriteOptions) error {
	if opts.Level == 0 {
		opts.Level = zstd.SpeedBetterCompression
	}
	if in.Initrd != "" && in.Kernel == "" {
		return errors.New("write bundle: an initrd needs a kernel")
	}
	if (in.Kernel != "") != (in.Metadata.Kernel != nil) {
		return errors.New("write bundle: metadata.kernel must be set exactly when a kernel is given")
	}
	st, err := os.Stat(in.RootFS)
	if err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	md := in.Metadata
	md.RootFSSize = st.Size()
	if md.Schema == 0 {
		md.Schema = SchemaVersion
	}
	if err := md.Validate(); err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	mdJSON, err := json.MarshalIndent(md, "", "  ")
	if err != nil {
		return err
	}
	zw, err := zstd.NewWriter(w, zstd.WithEncoderLevel(opts.Level), zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)))
	if err != nil {
		return err
	}
	bw := &bundleWriter{w: zw}
	bw.raw([]byte(BundleMagic))
	bw.member(memberHeader{Name: MemberMetadata, Size: int64(len(mdJSON)), Extents: [][2]int64{{0, int64(len(mdJSON))}}}, bytes.NewReader(mdJSON))
	members := 1
	for _, m := range []struct{ name, path string }{{MemberRootFS, in.RootFS}, {MemberKernel, in.Kernel}, {MemberInitrd, in.Initrd}} {
		if m.path == "" || bw.err != nil {
			continue
		}
		if err := bw.file(ctx, m.name, m.path, opts.Progress); err != nil {
			_ = zw.Close()
			return fmt.Errorf("write bundle: %s: %w", m.name, err)
		}
		members++
	}
	bw.member(memberHeader{End: true, Members: members}, nil)
	if bw.err != nil {
		_ = zw.Close()
		return fmt.Errorf("write bundle: %w", bw.err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	return nil
}

type bundleWriter struct {
	w   io.Writer
	err error
}

func (b *bundleWriter) raw(p []byte) {
	if b.err == nil {
		_, b.err = b.w.Write(p)
	}
}

func (b *bundleWriter) member(h memberHeader, data io.Reader) {
	hj, err := json.Marshal(h)
	if err != nil {
		b.err = err
		return
	}
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(hj))) // #nosec G115 -- bounded by maxHeaderBytes checks on read; headers are small
	b.raw(n[:])
	b.raw(hj)
	if data != nil && b.err == nil {
		_, b.err = io.Copy(b.w, data)
	}
}

// file writes one member from a file, storing only its data extents.
func (b *bundleWriter) file(ctx context.Context, name, path string, pf progress.Func) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	ext, err := DataExtents(ctx, f, st.Size())
	if err != nil {
		return err
	}
	var total int64
	for _, e := range ext {
		total += e[1]
	}
	pf.Report(progress.Event{Phase: "bundle", Item: name, Message: fmt.Sprintf("%d data extents, %d of %d bytes", len(ext), total, st.Size())})
	rs := make([]io.Reader, 0, len(ext))
	for _, e := range ext {
		rs = append(rs, io.NewSectionReader(f, e[0], e[1]))
	}
	b.member(memberHeader{Name: name, Size: st.Size(), Extents: ext}, &ctxReader{ctx: ctx, r: io.MultiReader(rs...)})
	if b.err != nil {
		return b.err
	}
	pf.Report(progress.Event{Phase: "bundle", Item: name, Done: true})
	return nil
}

// DataExtents returns the [offset, length] extents of f (of the given size)
// that hold data: the file system's data ranges (SEEK_DATA/SEEK_HOLE)
// without the 4 KiB blocks in them that are all zeros. Extents are
// ascending, disjoint and 4 KiB aligned except for the end of the file.
func DataExtents(ctx context.Context, f *os.File, size int64) ([][2]int64, error) {
	fd := int(f.Fd()) // #nosec G115 -- a file descriptor fits an int
	var out [][2]int64
	add := func(off, n int64) {
		if k := len(out); k > 0 && out[k-1][0]+out[k-1][1] == off {
			out[k-1][1] += n
			return
		}
		out = append(out, [2]int64{off, n})
	}
	buf := make([]byte, 1<<20)
	zero := make([]byte, extentBlock)
	for pos := int64(0); pos < size; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return nil, fmt.Errorf("seek data: %w", err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("seek hole: %w", err)
		}
		hole = min(hole, size)
		data -= data % extentBlock
		for off := data; off < hole; {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			n := min(int64(len(buf)), hole-off)
			if _, err := f.ReadAt(buf[:n], off); err != nil {
				return nil, fmt.Errorf("read at %d: %w", off, err)
			}
			for i := int64(0); i < n; i += extentBlock {
				blk := buf[i:min(i+extentBlock, n)]
				if !bytes.Equal(blk, zero[:len(blk)]) {
					add(off+i, int64(len(blk)))
				}
			}
			off += n
		}
		pos = hole
	}
	if len(out) > maxExtents {
		return nil, fmt.Errorf("%d data extents, the format allows %d", len(out), maxExtents)
	}
	return out, nil
}

// Unpacked is what Unpack wrote.
type Unpacked struct {
	Metadata Metadata
	RootFS   string // path of rootfs.ext4 in the destination
	Kernel   string // path of the kernel, or ""
	Initrd   string // path of the initrd, or ""
	// DataBytes is how many bytes of data were written (the rest of the
	// files' apparent sizes are holes).
	DataBytes int64
}

// memberLimits are the fixed names a bundle may create, with their size
// limits and file modes.
var memberLimits = map[string]struct {
	max  int64
	mode os.FileMode
}{
	MemberMetadata: {maxMetadataBytes, 0},
	MemberRootFS:   {maxRootFSBytes, 0o600},
	MemberKernel:   {maxKernelBytes, 0o644},
	MemberInitrd:   {maxInitrdBytes, 0o644},
}

// Unpack reads a bundle and writes its files into dstDir (which must
// exist; files are created, never replaced): rootfs.ext4 at its apparent
// size with only the data extents written, so holes stay holes, plus the
// kernel and initrd when the bundle has them. It validates everything it
// reads: the magic, member names (only the fixed ones, each once,
// metadata first), sizes and extents against the limits, the metadata, and
// the zstd frame checksum and end record, so a truncated or corrupt bundle
// fails with ErrBadBundle. On error, the files it created are removed.
// "unpack" events go to pf.
func Unpack(ctx context.Context, r io.Reader, dstDir string, pf progress.Func) (res Unpacked, retErr error) {
	zr, err := zstd.NewReader(r, zstd.WithDecoderMaxWindow(128<<20), zstd.WithDecoderConcurrency(2))
	if err != nil {
		return res, fmt.Errorf("unpack bundle: %w", err)
	}
	defer zr.Close()
	var created []string
	defer func() {
		if retErr != nil {
			for _, p := range created {
				_ = os.Remove(p)
			}
		}
	}()
	u := &unpacker{r: zr, buf: make([]byte, 1<<20), pf: pf}
	magic := make([]byte, len(BundleMagic))
	if err := u.readFull(magic, "magic"); err != nil {
		return res, err
	}
	if string(magic) != BundleMagic {
		return res, fmt.Errorf("unpack bundle: not a banger bundle (magic %q): %w", magic, ErrBadBundle)
	}
	seen := map[string]bool{}
	members := 0
	for {
		if err := ctx.Err(); err != nil {
			return res, fmt.Errorf("unpack bundle: %w", err)
		}
		h, err := u.header()
		if err != nil {
			return res, err
		}
		if h.End {
			if h.Members != members {
				return res, fmt.Errorf("unpack bundle: end record counts %d members, read %d: %w", h.Members, members, ErrBadBundle)
			}
			break
		}
		if members >= maxMembers {
			return res, fmt.Errorf("unpack bundle: more than %d members: %w", maxMembers, ErrBadBundle)
		}
		lim, ok := memberLimits[h.Name]
		switch {
		case !ok:
			return res, fmt.Errorf("unpack bundle: unknown member %q: %w", h.Name, ErrBadBundle)
		case seen[h.Name]:
			return res, fmt.Errorf("unpack bundle: member %q twice: %w", h.Name, ErrBadBundle)
		case (members == 0) != (h.Name == MemberMetadata):
			return res, fmt.Errorf("unpack bundle: member %q at position %d, metadata.json must come first: %w", h.Name, members, ErrBadBundle)
		case h.Size < 0 || h.Size > lim.max:
			return res, fmt.Errorf("unpack bundle: member %q: size %d out of range: %w", h.Name, h.Size, ErrBadBundle)
		}
		if err := checkExtents(h); err != nil {
			return res, err
		}
		seen[h.Name] = true
		members++
		if h.Name == MemberMetadata {
			if res.Metadata, err = u.metadata(h); err != nil {
				return res, err
			}
			continue
		}
		// The destination name is the fixed constant, never h.Name's bytes.
		var dst string
		switch h.Name {
		case MemberRootFS:
			if h.Size != res.Metadata.RootFSSize {
				return res, fmt.Errorf("unpack bundle: rootfs is %d bytes, the metadata says %d: %w", h.Size, res.Metadata.RootFSSize, ErrBadBundle)
			}
			dst = filepath.Join(dstDir, MemberRootFS)
			res.RootFS = dst
		case MemberKernel:
			dst = filepath.Join(dstDir, MemberKernel)
			res.Kernel = dst
		case MemberInitrd:
			dst = filepath.Join(dstDir, MemberInitrd)
			res.Initrd = dst
		}
		created = append(created, dst)
		n, err := u.file(ctx, h, dst, lim.mode)
		res.DataBytes += n
		if err != nil {
			return res, err
		}
	}
	// Read to the end of the stream: that checks the frame checksum and
	// that nothing follows the end record.
	var one [1]byte
	if n, err := io.ReadFull(zr, one[:]); n != 0 || !errors.Is(err, io.EOF) {
		if err == nil || errors.Is(err, io.ErrUnexpectedEOF) {
			err = errors.New("data after the end record")
		}
		return res, fmt.Errorf("unpack bundle: %w: %w", ErrBadBundle, err)
	}
	switch {
	case !seen[MemberRootFS]:
		return res, fmt.Errorf("unpack bundle: no %s: %w", MemberRootFS, ErrBadBundle)
	case seen[MemberInitrd] && !seen[MemberKernel]:
		return res, fmt.Errorf("unpack bundle: an initrd without a kernel: %w", ErrBadBundle)
	case seen[MemberKernel] != (res.Metadata.Kernel != nil):
		return res, fmt.Errorf("unpack bundle: kernel member and metadata.kernel disagree: %w", ErrBadBundle)
	}
	return res, nil
}

// checkExtents validates a member header's extents: ascending, disjoint,
// non-empty and inside the member's size.
func checkExtents(h memberHeader) error {
	if len(h.Extents) > maxExtents {
		return fmt.Errorf("unpack bundle: member %q: %d extents: %w", h.Name, len(h.Extents), ErrBadBundle)
	}
	var end int64
	for _, e := range h.Extents {
		off, n := e[0], e[1]
		if off < end || n <= 0 || n > h.Size || off > h.Size-n {
			return fmt.Errorf("unpack bundle: member %q: extent [%d, %d] out of order or outside %d bytes: %w", h.Name, off, n, h.Size, ErrBadBundle)
		}
		end = off + n
	}
	return nil
}

type unpacker struct {
	r    io.Reader
	buf  []byte
	pf   progress.Func
	read int64 // decompressed bytes read, for error messages
}

// readFull reads exactly len(p) bytes; a short stream is a truncated bundle.
func (u *unpacker) readFull(p []byte, what string) error {
	n, err := io.ReadFull(u.r, p)
	u.read += int64(n)
	if err != nil {
		return u.streamErr(what, err)
	}
	return nil
}

func (u *unpacker) streamErr(what string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("unpack bundle: truncated: the stream ends in %s after %d bytes: %w", what, u.read, ErrBadBundle)
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("unpack bundle: %w", err)
	}
	return fmt.Errorf("unpack bundle: corrupt stream in %s after %d bytes: %w: %w", what, u.read, ErrBadBundle, err)
}

func (u *unpacker) header() (memberHeader, error) {
	var n [4]byte
	if err := u.readFull(n[:], "a member header"); err != nil {
		return memberHeader{}, err
	}
	l := binary.BigEndian.Uint32(n[:])
	if l == 0 || l > maxHeaderBytes {
		return memberHeader{}, fmt.Errorf("unpack bundle: member header of %d bytes: %w", l, ErrBadBundle)
	}
	hj := make([]byte, l)
	if err := u.readFull(hj, "a member header"); err != nil {
		return memberHeader{}, err
	}
	var h memberHeader
	dec := json.NewDecoder(bytes.NewReader(hj))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return memberHeader{}, fmt.Errorf("unpack bundle: member header: %w: %w", ErrBadBundle, err)
	}
	return h, nil
}

func (u *unpacker) metadata(h memberHeader) (Metadata, error) {
	if len(h.Extents) != 1 || h.Extents[0][0] != 0 || h.Extents[0][1] != h.Size {
		return Metadata{}, fmt.Errorf("unpack bundle: metadata.json must be one extent: %w", ErrBadBundle)
	}
	data := make([]byte, h.Size)
	if err := u.readFull(data, MemberMetadata); err != nil {
		return Metadata{}, err
	}
	var md Metadata
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&md); err != nil {
		return Metadata{}, fmt.Errorf("unpack bundle: metadata.json: %w: %w", ErrBadBundle, err)
	}
	if err := md.Validate(); err != nil {
		return Metadata{}, fmt.Errorf("unpack bundle: %w", err)
	}
	u.pf.Report(progress.Event{Phase: "unpack", Item: md.Name, Message: fmt.Sprintf("%s %s, %d byte rootfs", md.OS.ID, md.OS.Version, md.RootFSSize)})
	return md, nil
}

// file creates dst at h.Size and writes the extents' data into it.
func (u *unpacker) file(ctx context.Context, h memberHeader, dst string, mode os.FileMode) (written int64, retErr error) {
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return 0, fmt.Errorf("unpack bundle: create %s: %w", dst, err)
	}
	defer func() {
		if err := f.Close(); err != nil && retErr == nil {
			retErr = fmt.Errorf("unpack bundle: close %s: %w", dst, err)
		}
	}()
	if err := f.Truncate(h.Size); err != nil {
		return 0, fmt.Errorf("unpack bundle: size %s: %w", dst, err)
	}
	var total int64
	for _, e := range h.Extents {
		total += e[1]
	}
	last := time.Now()
	for _, e := range h.Extents {
		off, left := e[0], e[1]
		for left > 0 {
			if err := ctx.Err(); err != nil {
				return written, fmt.Errorf("unpack bundle: %w", err)
			}
			chunk := u.buf[:min(int64(len(u.buf)), left)]
			if err := u.readFull(chunk, h.Name); err != nil {
				return written, err
			}
			if _, err := f.WriteAt(chunk, off); err != nil {
				return written, fmt.Errorf("unpack bundle: write %s: %w", dst, err)
			}
			n := int64(len(chunk))
			off, left, written = off+n, left-n, written+n
			if time.Since(last) > 200*time.Millisecond {
				last = time.Now()
				u.pf.Report(progress.Event{Phase: "unpack", Item: h.Name, Current: written, Total: total, Unit: "bytes"})
			}
		}
	}
	if err := f.Sync(); err != nil {
		return written, fmt.Errorf("unpack bundle: sync %s: %w", dst, err)
	}
	u.pf.Report(progress.Event{Phase: "unpack", Item: h.Name, Current: written, Total: total, Unit: "bytes", Done: true})
	return written, nil
}

// UnpackFile is Unpack reading the bundle file at path.
func UnpackFile(ctx context.Context, path, dstDir string, pf progress.Func) (Unpacked, error) {
	f, err := os.Open(path)
	if err != nil {
		return Unpacked{}, fmt.Errorf("unpack bundle: %w", err)
	}
	defer f.Close()
	return Unpack(ctx, f, dstDir, pf)
}

// CheckMetadata checks that a bundle's metadata belongs to the catalog
// entry it was pulled as.
func CheckMetadata(md Metadata, e Entry) error {
	if md.Name != e.Name {
		return fmt.Errorf("the bundle is for %q, not %q: %w", md.Name, e.Name, ErrBadBundle)
	}
	return nil
}
