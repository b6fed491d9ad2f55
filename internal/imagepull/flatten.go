package imagepull

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/progress"
)

// Errors Flatten wraps (inside an *EntryError when an entry caused them).
var (
	// ErrUnsafeEntry marks an entry that would escape the staging directory
	// or could not be encoded safely: a ".." component, a write through a
	// symlink, a hardlink to outside the tree, a whiteout of "." or "..",
	// a name with control bytes.
	ErrUnsafeEntry = errors.New("unsafe layer entry")
	// ErrTooLarge marks layers whose decompressed bytes exceed the pull's
	// budget (FlattenOptions.MaxBytes, or the staging file system's free
	// space) or whose entries exceed MaxEntries: a decompression bomb, or
	// an image too large for the requested size or the disk.
	ErrTooLarge = errors.New("image content exceeds the limit")
	// ErrBadEntry marks an entry Flatten cannot replay: an unsupported tar
	// type, a hardlink to a missing file, a file below a non-directory.
	ErrBadEntry = errors.New("invalid layer entry")
)

// Defaults for FlattenOptions.
const (
	DefaultMaxEntries = 4 << 20 // tar entries over all layers
	// FreeSpaceReserve is what the default budget leaves free on the
	// staging file system: the decompressed layers may use its free space
	// minus this much.
	FreeSpaceReserve int64 = 512 << 20
	// MaxEntryXattrs is the most xattr bytes (names plus values) one entry
	// may carry: ext4 without ea_inode keeps an inode's xattrs in the
	// inode's spare space and one 4 KiB block.
	MaxEntryXattrs = 4 << 10
	// MaxXattrBytes bounds the xattr bytes Flatten keeps in the Metadata
	// over the whole image, so that many small entries with large xattrs
	// cannot grow the daemon's heap.
	MaxXattrBytes = 16 << 20
)

// maxComponent is the longest file name ext4 can hold.
const maxComponent = 255

// maxSymlinkTarget is the longest symlink target Linux accepts.
const maxSymlinkTarget = 4095

// EntryError is returned by Flatten for a layer entry it refuses or cannot
// replay. Error() names the layer (index, oldest is 0, and digest) and the
// entry (quoted, so control bytes show escaped).
type EntryError struct {
	Layer  int
	Digest string
	Entry  string
	Err    error
}

func (e *EntryError) Error() string {
	return fmt.Sprintf("layer %d (%s): entry %q: %v", e.Layer, e.Digest, e.Entry, e.Err)
}

func (e *EntryError) Unwrap() error { return e.Err }

// LayerSource is what Flatten reads: an image's layers, oldest first. *Image
// is one.
type LayerSource interface {
	// Layers describes the layers, oldest (base) first.
	Layers() []Layer
	// OpenLayer returns layer i's uncompressed tar stream. Close must
	// report content that failed verification.
	OpenLayer(ctx context.Context, i int) (io.ReadCloser, error)
}

// Prefetcher is an optional speed-up of a LayerSource: Flatten calls
// Prefetch for the later layers in the background, so that downloading them
// overlaps replaying the earlier ones. Errors are ignored: OpenLayer
// reports them.
type Prefetcher interface {
	Prefetch(ctx context.Context, i int) error
}

// FlattenOptions configure Flatten.
type FlattenOptions struct {
	// MaxBytes is the pull's decompression budget: every byte decompressed
	// from the layers counts (tar headers, PAX records and the xattrs in
	// them, file bodies, the bodies of whiteouts and other skipped
	// entries), summed over all layers, so a file a later layer replaces
	// counts twice. The budget is the smaller of MaxBytes (when positive)
	// and the free space of the staging file system minus
	// FreeSpaceReserve (see Budget). The daemon passes the target ext4
	// size when the user gives one.
	MaxBytes int64
	// MaxEntries limits the number of tar entries over all layers. Zero
	// means DefaultMaxEntries.
	MaxEntries int
	// Progress receives "flatten" events, one per layer started and done.
	Progress progress.Func
}

// Flatten replays src's layers, oldest first, into stagingDir, which must
// exist and be empty (make it 0700: it holds the image's files while they
// are still owned by the daemon), and returns the Metadata of the final
// tree. It does not use go-containerregistry's mutate.Extract.
//
// Layer semantics (OCI image spec, "Applying changesets"):
//   - ".wh.NAME" deletes NAME from the lower layers; ".wh..wh..opq" deletes
//     every lower-layer entry of its directory. Whiteouts never delete what
//     the same layer adds, whatever the order of the entries. Other
//     ".wh..wh.*" names (aufs bookkeeping) are ignored.
//   - an entry replaces what was at its path, whatever its type (a directory
//     replaced by a file and back); two entries for one path: the last
//     wins. A directory entry over a directory merges and updates metadata.
//   - a file is always replaced by a new inode, never rewritten in place, so
//     a hardlink keeps the content its target had when it was linked even
//     when a later layer removes or replaces the target
//     (go-containerregistry #977, #2002).
//   - symlink targets are stored exactly as given, absolute or relative.
//
// Safety: every path is resolved from a descriptor of stagingDir with
// openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV), and the last
// component is created with O_EXCL/O_NOFOLLOW semantics, so no symlink in
// the tree (planted by an earlier entry or layer) is ever followed and
// nothing outside stagingDir is ever written. Flatten refuses, with an
// *EntryError wrapping ErrUnsafeEntry: ".." components, writes below a
// symlink, hardlinks whose target has a ".." component, whiteouts of "." or
// "..", and names that CheckName rejects (bytes below 0x20 or 0x7f).
// Absolute names are taken relative to the root, as every runtime does.
//
// Extraction is unprivileged (see Metadata for what is in stagingDir and
// what only in the Metadata). On error, stagingDir holds a partial tree: the
// caller removes it.
func Flatten(ctx context.Context, src LayerSource, stagingDir string, opts FlattenOptions) (Metadata, error) {
	budget, err := Budget(stagingDir, opts.MaxBytes)
	if err != nil {
		return nil, err
	}
	opts.MaxBytes = budget
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = DefaultMaxEntries
	}
	root, err := unix.Open(stagingDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open staging dir %q: %w", stagingDir, err)
	}
	defer unix.Close(root)
	if empty, err := dirEmpty(stagingDir); err != nil || !empty {
		if err == nil {
			err = errors.New("not empty")
		}
		return nil, fmt.Errorf("staging dir %q: %w", stagingDir, err)
	}

	f := newFlattener(opts)
	f.root = root
	f.buf = make([]byte, 1<<20)
	if err := f.replayAll(ctx, src, "flatten"); err != nil {
		return nil, err
	}
	if err := f.restoreDirTimes(); err != nil {
		return nil, err
	}
	return f.md, nil
}

func newFlattener(opts FlattenOptions) *flattener {
	return &flattener{
		root:     -1,
		md:       Metadata{"": {Type: TypeDir, Mode: 0o755}},
		children: map[string]map[string]struct{}{},
		dirTimes: map[string]time.Time{},
		opts:     opts,
	}
}

// replayAll replays every layer, oldest first, prefetching the later ones
// in the background; phase names its progress events.
func (f *flattener) replayAll(ctx context.Context, src LayerSource, phase string) error {
	layers := src.Layers()
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait() // runs after cancel: no download outlives the replay
	defer cancel()
	if p, ok := src.(Prefetcher); ok && len(layers) > 1 {
		wg.Go(func() {
			for i := 1; i < len(layers) && ctx.Err() == nil; i++ {
				_ = p.Prefetch(ctx, i)
			}
		})
	}
	for i, l := range layers {
		f.opts.Progress.Report(progress.Event{Phase: phase, Item: l.Digest, Current: int64(i), Total: int64(len(layers)), Unit: "layers"})
		if err := f.replay(ctx, src, i, l); err != nil {
			return err
		}
		f.opts.Progress.Report(progress.Event{Phase: phase, Item: l.Digest, Current: int64(i + 1), Total: int64(len(layers)), Unit: "layers", Done: true})
	}
	return nil
}

// Budget is the decompression budget of a pull that stages on dir's file
// system: the free space there minus FreeSpaceReserve, or limit when that
// is positive and smaller. A file system without room for the reserve
// fails with ErrTooLarge.
func Budget(dir string, limit int64) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("free space of %q: %w", dir, err)
	}
	free := int64(st.Bavail) * st.Bsize //nolint:gosec // block counts fit in int64
	budget := free - FreeSpaceReserve
	if budget <= 0 {
		return 0, fmt.Errorf("%q has %d bytes free, less than the %d bytes a pull keeps in reserve: %w", dir, free, FreeSpaceReserve, ErrTooLarge)
	}
	if limit > 0 && limit < budget {
		budget = limit
	}
	return budget, nil
}

// budgetReader counts every byte read from a decompressed layer against
// the pull's budget and fails once the budget is spent.
type budgetReader struct {
	r     io.Reader
	n     *int64 // bytes read so far, over all layers
	limit int64
}

func (b budgetReader) Read(p []byte) (int, error) {
	rem := b.limit - *b.n
	if rem <= 0 {
		return 0, fmt.Errorf("the layers decompress to more than %d bytes: %w", b.limit, ErrTooLarge)
	}
	if int64(len(p)) > rem {
		p = p[:rem]
	}
	n, err := b.r.Read(p)
	*b.n += int64(n)
	return n, err
}

func dirEmpty(dir string) (bool, error) {
	d, err := os.Open(dir)
	if err != nil {
		return false, err
	}
	defer d.Close()
	names, err := d.Readdirnames(1)
	if errors.Is(err, io.EOF) {
		return true, nil
	}
	return len(names) == 0, err
}

// flattener holds the state of one Flatten. md and children mirror the
// staging tree exactly (plus the devices and FIFOs that exist only in md);
// every ancestor of an md entry is a directory in md.
type flattener struct {
	root     int // O_PATH descriptor of the staging dir
	md       Metadata
	children map[string]map[string]struct{} // directory -> names in it
	dirTimes map[string]time.Time           // directory mtimes, set last
	opts     FlattenOptions
	buf      []byte

	// meta is set for a metadata-only replay (Scan): nothing is written
	// anywhere, and extra records what the ext4 writer needs that the
	// Metadata does not hold.
	meta  bool
	extra map[string]entryExtra
	// spoolDir, when set (Scan), is where each layer's decompressed tar
	// is kept for the second pass (spooler); spools[i] is layer i's, or
	// "" where it was not kept.
	spoolDir   string
	spoolLimit int64
	spoolUsed  int64
	spools     []string
	bytes      int64 // bytes decompressed so far, over all layers
	// xattr bytes decoded so far
	xattrBytes int64
	entries    int

	// Per layer: the paths its entries made, and their ancestors.
	layer     int
	digest    string
	written   map[string]bool
	ancestors map[string]bool
}

// entryExtra is what a metadata-only replay keeps per path beside its
// FileMeta.
type entryExtra struct {
	origin int       // ordinal (over all layers, from 1) of the entry whose content or node this is
	mtime  time.Time // the entry's mtime
	link   string    // symlink target
}

// dirFD opens directory dir of the tree; -1 in a metadata-only replay.
func (f *flattener) dirFD(dir string) (int, error) {
	if f.meta {
		return -1, nil
	}
	return f.openDir(dir)
}

// subFD opens directory base below pfd; -1 in a metadata-only replay.
func (f *flattener) subFD(pfd int, base string) (int, error) {
	if f.meta {
		return -1, nil
	}
	return openBeneath(pfd, base)
}

func closeFD(fd int) {
	if fd >= 0 {
		_ = unix.Close(fd)
	}
}

// replay applies layer i.
func (f *flattener) replay(ctx context.Context, src LayerSource, i int, l Layer) (err error) {
	f.layer, f.digest = i, l.Digest
	f.written, f.ancestors = map[string]bool{}, map[string]bool{}
	rc, err := src.OpenLayer(ctx, i)
	if err != nil {
		return fmt.Errorf("open layer %d (%s): %w", i, l.Digest, err)
	}
	defer func() {
		// Close verifies the blob; a corrupt blob is the root cause of
		// whatever else went wrong reading it, so it wins.
		if cerr := rc.Close(); cerr != nil && (err == nil || errors.Is(cerr, ErrDigestMismatch)) {
			err = fmt.Errorf("layer %d (%s): %w", i, l.Digest, cerr)
		}
	}()
	var in io.Reader = budgetReader{r: rc, n: &f.bytes, limit: f.opts.MaxBytes}
	if f.spoolDir != "" {
		for len(f.spools) <= i {
			f.spools = append(f.spools, "")
		}
		if sp := newSpooler(f.spoolDir, i, f.spoolLimit, &f.spoolUsed); sp != nil {
			in = io.TeeReader(in, sp)
			whole := false
			defer func() { f.spools[i] = sp.finish(whole && err == nil) }()
			defer func() { whole = err == nil }()
		}
	}
	tr := tar.NewReader(in)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("layer %d (%s): read tar: %w", i, l.Digest, err)
		}
		f.entries++
		if f.entries > f.opts.MaxEntries {
			return f.entryErr(hdr.Name, fmt.Errorf("more than %d entries: %w", f.opts.MaxEntries, ErrTooLarge))
		}
		if err := f.apply(hdr, tr); err != nil {
			var ee *EntryError
			if errors.As(err, &ee) {
				return err
			}
			return f.entryErr(hdr.Name, err)
		}
	}
}

func (f *flattener) entryErr(entry string, err error) error {
	return &EntryError{Layer: f.layer, Digest: f.digest, Entry: entry, Err: err}
}

// cleanName turns a tar name into a path relative to the root: leading
// slashes, "." and empty components dropped. ".." is refused.
func cleanName(name string) (string, error) {
	parts := strings.Split(name, "/")
	out := parts[:0]
	for _, p := range parts {
		switch p {
		case "", ".":
			continue
		case "..":
			return "", fmt.Errorf("path has a \"..\" component: %w", ErrUnsafeEntry)
		}
		if len(p) > maxComponent {
			return "", fmt.Errorf("component is %d bytes long, more than %d: %w", len(p), maxComponent, ErrUnsafeEntry)
		}
		out = append(out, p)
	}
	rel := strings.Join(out, "/")
	if err := CheckName(rel); err != nil {
		return "", fmt.Errorf("%w: %w", ErrUnsafeEntry, err)
	}
	return rel, nil
}

// split returns the parent directory ("" for the root) and base of rel.
func split(rel string) (string, string) {
	i := strings.LastIndexByte(rel, '/')
	if i < 0 {
		return "", rel
	}
	return rel[:i], rel[i+1:]
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

// apply replays one tar entry.
func (f *flattener) apply(hdr *tar.Header, r io.Reader) error {
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader:
		return nil
	case tar.TypeReg, tar.TypeGNUSparse, tar.TypeDir, tar.TypeSymlink, tar.TypeLink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
	default:
		return fmt.Errorf("tar type %q is not supported: %w", hdr.Typeflag, ErrBadEntry)
	}
	rel, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	dir, base := split(rel)
	if strings.HasPrefix(base, ".wh.") {
		return f.whiteout(dir, base)
	}
	meta, err := headerMeta(hdr)
	if err != nil {
		return err
	}
	for name, v := range meta.Xattrs {
		if f.xattrBytes += int64(len(name) + len(v)); f.xattrBytes > MaxXattrBytes {
			return fmt.Errorf("the image's xattrs exceed %d bytes: %w", MaxXattrBytes, ErrTooLarge)
		}
	}
	if rel == "" {
		if meta.Type != TypeDir {
			return fmt.Errorf("the root must be a directory: %w", ErrUnsafeEntry)
		}
		f.md[""] = meta
		f.dirTimes[""] = hdr.ModTime
		return nil
	}
	if err := f.mkdirParents(dir); err != nil {
		return err
	}
	pfd, err := f.dirFD(dir)
	if err != nil {
		return err
	}
	defer closeFD(pfd)
	if f.meta && meta.Type != TypeHardlink {
		defer func() {
			if _, ok := f.md[rel]; ok && f.written[rel] {
				f.extra[rel] = entryExtra{origin: f.entries, mtime: hdr.ModTime, link: hdr.Linkname}
			}
		}()
	}

	switch meta.Type {
	case TypeDir:
		if old, ok := f.md[rel]; ok && old.Type == TypeDir {
			f.md[rel] = meta // merge: keep the contents, take the new metadata
		} else {
			if err := f.removeAll(pfd, base, rel); err != nil {
				return err
			}
			if !f.meta {
				if err := unix.Mkdirat(pfd, base, stagingPerm(meta)); err != nil {
					return fmt.Errorf("mkdir: %w", err)
				}
			}
			f.add(rel, meta)
		}
		f.dirTimes[rel] = hdr.ModTime
	case TypeRegular:
		if hdr.Size > f.opts.MaxBytes-f.bytes {
			return fmt.Errorf("%d bytes would bring the decompressed layers to %d bytes, over the budget of %d: %w",
				hdr.Size, f.bytes+hdr.Size, f.opts.MaxBytes, ErrTooLarge)
		}
		if err := f.removeAll(pfd, base, rel); err != nil {
			return err
		}
		if !f.meta {
			if err := f.writeFile(pfd, base, meta, hdr, r); err != nil {
				return err
			}
		}
		f.add(rel, meta)
	case TypeSymlink:
		if hdr.Linkname == "" || len(hdr.Linkname) > maxSymlinkTarget || strings.IndexByte(hdr.Linkname, 0) >= 0 {
			return fmt.Errorf("symlink target of %d bytes is invalid: %w", len(hdr.Linkname), ErrBadEntry)
		}
		if err := f.removeAll(pfd, base, rel); err != nil {
			return err
		}
		if !f.meta {
			if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
				return fmt.Errorf("symlink: %w", err)
			}
			f.setTime(pfd, base, hdr.ModTime)
		}
		f.add(rel, meta)
	case TypeHardlink:
		return f.hardlink(pfd, rel, base, hdr.Linkname)
	case TypeCharDev, TypeBlockDev, TypeFIFO:
		// Not created in staging (that needs privilege): ApplyOwnership
		// makes them in the ext4 from the Metadata.
		if err := f.removeAll(pfd, base, rel); err != nil {
			return err
		}
		f.add(rel, meta)
	}
	return nil
}

// headerMeta converts a tar header to FileMeta.
func headerMeta(hdr *tar.Header) (FileMeta, error) {
	m := FileMeta{UID: hdr.Uid, GID: hdr.Gid, Mode: fs.FileMode(hdr.Mode & 0o777)}
	if hdr.Uid < 0 || hdr.Gid < 0 || int64(hdr.Uid) > 0xFFFFFFFE || int64(hdr.Gid) > 0xFFFFFFFE {
		return m, fmt.Errorf("uid %d gid %d out of range: %w", hdr.Uid, hdr.Gid, ErrBadEntry)
	}
	if hdr.Mode&0o4000 != 0 {
		m.Mode |= fs.ModeSetuid
	}
	if hdr.Mode&0o2000 != 0 {
		m.Mode |= fs.ModeSetgid
	}
	if hdr.Mode&0o1000 != 0 {
		m.Mode |= fs.ModeSticky
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse:
		m.Type = TypeRegular
		if hdr.Size < 0 {
			return m, fmt.Errorf("negative size: %w", ErrBadEntry)
		}
		m.Size = hdr.Size
	case tar.TypeDir:
		m.Type = TypeDir
	case tar.TypeSymlink:
		// Linux symlinks are always 0777 (the kernel ignores and GNU tar
		// and umoci give 0777 whatever the header says): never l---------.
		m.Type, m.Mode = TypeSymlink, 0o777
	case tar.TypeLink:
		m.Type = TypeHardlink
	case tar.TypeChar, tar.TypeBlock:
		m.Type = TypeCharDev
		if hdr.Typeflag == tar.TypeBlock {
			m.Type = TypeBlockDev
		}
		if hdr.Devmajor < 0 || hdr.Devminor < 0 || hdr.Devmajor > 0xFFFFFFFF || hdr.Devminor > 0xFFFFFFFF {
			return m, fmt.Errorf("device %d:%d out of range: %w", hdr.Devmajor, hdr.Devminor, ErrBadEntry)
		}
		m.DevMajor, m.DevMinor = uint32(hdr.Devmajor), uint32(hdr.Devminor)
	case tar.TypeFifo:
		m.Type = TypeFIFO
	}
	xattrBytes := 0
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		switch ns, _, _ := strings.Cut(name, "."); ns {
		case "security", "user", "trusted", "system":
		default:
			continue // not a Linux xattr namespace: ext4 cannot hold it
		}
		if err := CheckXattrName(name); err != nil {
			return m, fmt.Errorf("%w: %w", ErrUnsafeEntry, err)
		}
		if xattrBytes += len(name) + len(v); xattrBytes > MaxEntryXattrs {
			return m, fmt.Errorf("xattrs of more than %d bytes: %w", MaxEntryXattrs, ErrTooLarge)
		}
		if m.Xattrs == nil {
			m.Xattrs = map[string][]byte{}
		}
		m.Xattrs[name] = []byte(v)
	}
	return m, nil
}

// stagingPerm is the mode a staged file gets: its permission bits, never
// setuid/setgid/sticky (the daemon owns staging; a setuid file there would
// be setuid root), and at least u+rw (u+rwx for directories) so that the
// daemon and mkfs.ext4 -d can read it. The true mode is in Metadata.
func stagingPerm(m FileMeta) uint32 {
	perm := uint32(m.Mode.Perm()) | 0o600
	if m.Type == TypeDir {
		perm |= 0o700
	}
	return perm
}

// add records a new entry made in the current layer.
func (f *flattener) add(rel string, m FileMeta) {
	f.md[rel] = m
	dir, base := split(rel)
	c := f.children[dir]
	if c == nil {
		c = map[string]struct{}{}
		f.children[dir] = c
	}
	c[base] = struct{}{}
	f.written[rel] = true
	for dir != "" && !f.ancestors[dir] {
		f.ancestors[dir] = true
		dir, _ = split(dir)
	}
}

// mkdirParents makes sure every component of dir is a directory, creating
// missing ones (root-owned, 0755, as runtimes do). A symlink component is
// refused: the entry would be written through it.
func (f *flattener) mkdirParents(dir string) error {
	if dir == "" {
		return nil
	}
	if m, ok := f.md[dir]; ok {
		switch m.Type {
		case TypeDir:
			return nil
		case TypeSymlink:
			return fmt.Errorf("parent %q is a symlink; refusing to write through it: %w", dir, ErrUnsafeEntry)
		default:
			return fmt.Errorf("parent %q is not a directory: %w", dir, ErrBadEntry)
		}
	}
	parent, base := split(dir)
	if err := f.mkdirParents(parent); err != nil {
		return err
	}
	meta := FileMeta{Type: TypeDir, Mode: 0o755}
	if !f.meta {
		pfd, err := f.openDir(parent)
		if err != nil {
			return err
		}
		defer unix.Close(pfd)
		if err := unix.Mkdirat(pfd, base, stagingPerm(meta)); err != nil {
			return fmt.Errorf("mkdir %q: %w", dir, err)
		}
	}
	f.add(dir, meta)
	return nil
}

// resolveHow is how every path inside staging is opened.
var resolveHow = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV

// openDir opens directory dir of the staging tree (O_PATH), refusing any
// symlink on the way.
func (f *flattener) openDir(dir string) (int, error) {
	return openBeneath(f.root, dir)
}

// openBeneath opens rel below dirfd as an O_PATH directory descriptor
// without following any symlink or leaving dirfd.
func openBeneath(dirfd int, rel string) (int, error) {
	if rel == "" {
		rel = "."
	}
	for {
		fd, err := unix.Openat2(dirfd, rel, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC,
			Resolve: uint64(resolveHow),
		})
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) {
			return -1, fmt.Errorf("open %q: a symlink or mount is in the way: %w", rel, ErrUnsafeEntry)
		}
		if err != nil {
			return -1, fmt.Errorf("open %q: %w", rel, err)
		}
		return fd, nil
	}
}

// writeFile creates base in pfd (which must not exist) with the entry's
// content.
func (f *flattener) writeFile(pfd int, base string, m FileMeta, hdr *tar.Header, r io.Reader) error {
	fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, stagingPerm(m))
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	file := os.NewFile(uintptr(fd), base)
	defer file.Close()
	if err := file.Chmod(fs.FileMode(stagingPerm(m))); err != nil { // umask
		return fmt.Errorf("chmod: %w", err)
	}
	n, err := io.CopyBuffer(onlyWriter{file}, io.LimitReader(r, hdr.Size), f.buf)
	if err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if n != hdr.Size {
		return fmt.Errorf("content ends after %d of %d bytes: %w", n, hdr.Size, io.ErrUnexpectedEOF)
	}
	if !hdr.ModTime.IsZero() {
		ts := unix.NsecToTimespec(hdr.ModTime.UnixNano())
		_ = unix.UtimesNanoAt(pfd, base, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW)
	}
	if err := file.Close(); err != nil {
		return fmt.Errorf("close: %w", err)
	}
	return nil
}

// onlyWriter hides *os.File's ReadFrom, so that io.CopyBuffer uses the
// buffer (sendfile/splice do not apply to a tar stream).
type onlyWriter struct{ io.Writer }

func (f *flattener) setTime(pfd int, base string, t time.Time) {
	if t.IsZero() {
		return
	}
	ts := unix.NsecToTimespec(t.UnixNano())
	_ = unix.UtimesNanoAt(pfd, base, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW)
}

// hardlink makes rel (base in pfd) a hardlink to the current version of
// linkname.
func (f *flattener) hardlink(pfd int, rel, base, linkname string) error {
	target, err := cleanName(linkname)
	if err != nil {
		return fmt.Errorf("hardlink target %q: %w", linkname, err)
	}
	if target == "" {
		return fmt.Errorf("hardlink to the root: %w", ErrUnsafeEntry)
	}
	tm, ok := f.md[target]
	if !ok {
		return fmt.Errorf("hardlink target %q does not exist: %w", target, ErrBadEntry)
	}
	if tm.Type == TypeDir {
		return fmt.Errorf("hardlink target %q is a directory: %w", target, ErrBadEntry)
	}
	if target == rel {
		return nil // a link to itself changes nothing
	}
	if strings.HasPrefix(target, rel+"/") {
		return fmt.Errorf("hardlink target %q is inside the entry it replaces: %w", target, ErrBadEntry)
	}
	if err := f.removeAll(pfd, base, rel); err != nil {
		return err
	}
	meta := tm
	meta.Xattrs = maps.Clone(tm.Xattrs)
	if f.meta {
		x := f.extra[target]
		if isSpecial(tm.Type) {
			x.origin = f.entries // a node of its own, as in staging
		}
		f.add(rel, meta)
		f.extra[rel] = x
		return nil
	}
	if tm.Type == TypeCharDev || tm.Type == TypeBlockDev || tm.Type == TypeFIFO {
		// Only in Metadata: ApplyOwnership makes a node of its own.
		f.add(rel, meta)
		return nil
	}
	tdir, tbase := split(target)
	tfd, err := f.openDir(tdir)
	if err != nil {
		return err
	}
	defer unix.Close(tfd)
	// Flags 0: a symlink target is linked itself, never followed.
	if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
		return fmt.Errorf("hardlink to %q: %w", target, err)
	}
	f.add(rel, meta)
	return nil
}

// whiteout applies ".wh.NAME" or ".wh..wh..opq" in dir.
func (f *flattener) whiteout(dir, base string) error {
	if base == ".wh..wh..opq" {
		return f.opaque(dir)
	}
	if strings.HasPrefix(base, ".wh..wh.") {
		return nil // aufs metadata (e.g. .wh..wh.plnk), not a whiteout
	}
	name := strings.TrimPrefix(base, ".wh.")
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("whiteout of %q: %w", name, ErrUnsafeEntry)
	}
	if err := f.checkParents(dir); err != nil {
		return err
	}
	rel := join(dir, name)
	if _, ok := f.md[rel]; !ok {
		return nil
	}
	pfd, err := f.dirFD(dir)
	if err != nil {
		return err
	}
	defer closeFD(pfd)
	return f.removeLower(pfd, name, rel)
}

// opaque removes every lower-layer entry below dir.
func (f *flattener) opaque(dir string) error {
	if err := f.checkParents(dir); err != nil {
		return err
	}
	if m, ok := f.md[dir]; !ok || m.Type != TypeDir {
		return nil
	}
	fd, err := f.dirFD(dir)
	if err != nil {
		return err
	}
	defer closeFD(fd)
	for name := range f.children[dir] {
		if err := f.removeLower(fd, name, join(dir, name)); err != nil {
			return err
		}
	}
	return nil
}

// checkParents refuses a whiteout below a symlink.
func (f *flattener) checkParents(dir string) error {
	for d := dir; d != ""; d, _ = split(d) {
		if m, ok := f.md[d]; ok && m.Type == TypeSymlink {
			return fmt.Errorf("parent %q is a symlink; refusing to delete through it: %w", d, ErrUnsafeEntry)
		}
	}
	return nil
}

// removeLower removes rel (base in pfd) as a whiteout does: what the
// current layer made stays, lower-layer content goes.
func (f *flattener) removeLower(pfd int, base, rel string) error {
	if !f.written[rel] && !f.ancestors[rel] {
		return f.removeAll(pfd, base, rel)
	}
	if f.md[rel].Type != TypeDir {
		return nil
	}
	fd, err := f.subFD(pfd, base)
	if err != nil {
		return err
	}
	defer closeFD(fd)
	for name := range f.children[rel] {
		if err := f.removeLower(fd, name, join(rel, name)); err != nil {
			return err
		}
	}
	return nil
}

// removeAll removes rel (base in pfd) and everything below it from staging
// and from the Metadata. A path that does not exist is not an error.
func (f *flattener) removeAll(pfd int, base, rel string) error {
	m, ok := f.md[rel]
	if !ok {
		return nil
	}
	switch m.Type {
	case TypeDir:
		fd, err := f.subFD(pfd, base)
		if err != nil {
			return err
		}
		for name := range f.children[rel] {
			if err := f.removeAll(fd, name, join(rel, name)); err != nil {
				closeFD(fd)
				return err
			}
		}
		closeFD(fd)
		if !f.meta {
			if err := unix.Unlinkat(pfd, base, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("remove directory %q: %w", rel, err)
			}
		}
		delete(f.children, rel)
		delete(f.dirTimes, rel)
	case TypeCharDev, TypeBlockDev, TypeFIFO:
		// Only in Metadata.
	default:
		if !f.meta {
			if err := unix.Unlinkat(pfd, base, 0); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("remove %q: %w", rel, err)
			}
		}
	}
	delete(f.md, rel)
	delete(f.extra, rel)
	dir, _ := split(rel)
	delete(f.children[dir], base)
	delete(f.written, rel)
	delete(f.ancestors, rel)
	return nil
}

// restoreDirTimes sets directory mtimes from their entries, after all
// children are in place.
func (f *flattener) restoreDirTimes() error {
	for rel, t := range f.dirTimes {
		if _, ok := f.md[rel]; !ok || t.IsZero() {
			continue
		}
		if rel == "" {
			ts := unix.NsecToTimespec(t.UnixNano())
			_ = unix.UtimesNanoAt(f.root, ".", []unix.Timespec{ts, ts}, 0)
			continue
		}
		dir, base := split(rel)
		pfd, err := f.openDir(dir)
		if err != nil {
			return err
		}
		f.setTime(pfd, base, t)
		_ = unix.Close(pfd)
	}
	return nil
}
