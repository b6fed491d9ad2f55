package imagepull

// The direct builder: layers to ext4 without a staging tree.
//
// Pass 1 (Scan) replays the layers as Flatten does — the same code, with
// the same whiteout, opaque-dir, hardlink and type-change semantics and the
// same refusals — but writes nothing: it keeps only the final tree's
// metadata, and for every path the ordinal of the tar entry its content
// comes from. Pass 2 (writeDirect) reads the cached layer blobs again and
// streams one synthesized tar of the final tree into hcsshim's tar2ext4
// (a compact ext4 writer): first every directory (parents first), symlink,
// device and FIFO from the metadata, then every regular file's body
// straight from the layer entry that the final tree keeps, followed by its
// hardlinks. Owners, modes (setuid/setgid/sticky included), device numbers,
// xattrs and link counts are written as the inodes are made; no debugfs
// pass follows. tar2ext4's image is compact and read-only, so finish
// clears the read-only feature, grows it to the seed's size with
// resize2fs and adds a journal with tune2fs. Memory holds metadata only:
// file bodies go from the decompressor through a pipe to the writer.

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/Microsoft/hcsshim/ext4/tar2ext4"
	"golang.org/x/sys/unix"
)

// ErrDirectUnsupported is wrapped when the direct builder cannot build an
// image that the staging builder can (a tool is missing, or the writer
// cannot encode something); BuildImage then falls back to staging.
var ErrDirectUnsupported = errors.New("the direct ext4 builder cannot build this image")

// Scan replays src's layers like Flatten, writing nothing but the layer
// spools (see spooler), and returns the final tree for WriteExt4.
// budgetDir is the directory the image will be written to: its free space
// bounds the decompression budget (see Budget), and the spools go there.
// The caller must Close the tree (WriteExt4 does).
func Scan(ctx context.Context, src LayerSource, budgetDir string, opts FlattenOptions) (*Tree, error) {
	budget, err := Budget(budgetDir, opts.MaxBytes)
	if err != nil {
		return nil, err
	}
	opts.MaxBytes = budget
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = DefaultMaxEntries
	}
	f := newFlattener(opts)
	f.meta = true
	f.extra = map[string]entryExtra{}
	if spoolLayers {
		f.spoolDir, f.spoolLimit = budgetDir, budget/2
	}
	t := &Tree{f: f}
	if err := f.replayAll(ctx, src, "scan"); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

// spoolLayers turns Scan's layer spools on; only the benchmark turns it
// off, to measure what they give.
var spoolLayers = true

// Close removes the layer spools Scan kept for WriteExt4 (see spooler);
// WriteExt4 calls it when it ends. Calling it again does nothing.
func (t *Tree) Close() {
	for i, p := range t.f.spools {
		if p != "" {
			_ = os.Remove(p) //nolint:gosec // a spool path Scan made: <budgetDir>/.layer-<i>.tar
			t.f.spools[i] = ""
		}
	}
}

// spool is layer i's spool, or "".
func (t *Tree) spool(i int) string {
	if i < len(t.f.spools) {
		return t.f.spools[i]
	}
	return ""
}

// Tree is the final tree of an image as Scan computed it.
type Tree struct {
	f *flattener
	// reserve is the directory of placeholder inodes WriteExt4 adds (see
	// inodeReserve) and reserveN how many.
	reserve  string
	reserveN int64
}

// Metadata is the tree's metadata, as Flatten would return it.
func (t *Tree) Metadata() Metadata { return t.f.md }

// plan is what pass 2 needs: the regular files by the entry ordinal their
// content comes from (first path first), and the order of the rest.
type plan struct {
	files map[int][]string // entry ordinal -> paths sharing that inode
	dirs  []string         // every directory, parents first
	nodes []string         // symlinks, devices and FIFOs: one per inode
	links [][2]string      // extra names of symlink inodes: {path, first path}
}

func (t *Tree) plan() plan {
	p := plan{files: map[int][]string{}}
	keys := make([]string, 0, len(t.f.md))
	for k := range t.f.md {
		keys = append(keys, k)
	}
	sort.Strings(keys) // a directory sorts before everything below it
	symlinkFirst := map[int]string{}
	for _, k := range keys {
		m := t.f.md[k]
		switch m.Type {
		case TypeDir:
			p.dirs = append(p.dirs, k)
		case TypeRegular:
			o := t.f.extra[k].origin
			p.files[o] = append(p.files[o], k)
		case TypeSymlink:
			o := t.f.extra[k].origin
			if first, ok := symlinkFirst[o]; ok {
				p.links = append(p.links, [2]string{k, first})
				continue
			}
			symlinkFirst[o] = k
			p.nodes = append(p.nodes, k)
		default:
			p.nodes = append(p.nodes, k)
		}
	}
	return p
}

// header is the synthesized tar header of path rel.
func (t *Tree) header(rel string) (*tar.Header, error) {
	m := t.f.md[rel]
	x := t.f.extra[rel]
	name := rel
	if rel == "" {
		name = "."
	}
	h := &tar.Header{Name: name, Mode: int64(unixMode(m) & 0o7777), Uid: m.UID, Gid: m.GID, Format: tar.FormatPAX, ModTime: x.mtime}
	switch m.Type {
	case TypeDir:
		h.Typeflag, h.Name, h.ModTime = tar.TypeDir, name+"/", t.f.dirTimes[rel]
	case TypeRegular:
		h.Typeflag, h.Size = tar.TypeReg, m.Size
	case TypeSymlink:
		h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, x.link, 0o777
	case TypeCharDev:
		h.Typeflag, h.Devmajor, h.Devminor = tar.TypeChar, int64(m.DevMajor), int64(m.DevMinor)
	case TypeBlockDev:
		h.Typeflag, h.Devmajor, h.Devminor = tar.TypeBlock, int64(m.DevMajor), int64(m.DevMinor)
	case TypeFIFO:
		h.Typeflag = tar.TypeFifo
	default:
		return nil, fmt.Errorf("entry %q: type %d: %w", rel, m.Type, ErrBadMetadata)
	}
	if len(m.Xattrs) > 0 {
		h.PAXRecords = map[string]string{}
		for k, v := range m.Xattrs {
			if strings.HasPrefix(k, "system.posix_acl_") {
				disk, err := aclToDisk(v)
				if err != nil {
					return nil, fmt.Errorf("entry %q: xattr %s: %w: %w", rel, k, err, ErrDirectUnsupported)
				}
				v = disk
			}
			h.PAXRecords["SCHILY.xattr."+k] = string(v)
		}
	}
	return h, nil
}

// emit writes the synthesized tar of the final tree to tw (see the file
// comment), reading the regular files' bodies from src.
func (t *Tree) emit(ctx context.Context, src LayerSource, tw *tar.Writer) error {
	p := t.plan()
	write := func(rel string) error {
		h, err := t.header(rel)
		if err != nil {
			return err
		}
		return tw.WriteHeader(h)
	}
	for _, group := range [][]string{p.dirs, p.nodes} {
		for _, rel := range group {
			if err := write(rel); err != nil {
				return err
			}
		}
	}
	for _, l := range p.links {
		if err := tw.WriteHeader(&tar.Header{Name: l[0], Typeflag: tar.TypeLink, Linkname: l[1], Format: tar.FormatPAX}); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	ordinal := 0
	for i, l := range src.Layers() {
		if err := t.emitLayer(ctx, src, i, l, p.files, &ordinal, tw); err != nil {
			return err
		}
	}
	if t.reserveN > 0 {
		if err := tw.WriteHeader(&tar.Header{Name: t.reserve + "/", Typeflag: tar.TypeDir, Mode: 0o700, Format: tar.FormatPAX}); err != nil {
			return err
		}
		for n := range t.reserveN {
			if err := tw.WriteHeader(&tar.Header{Name: t.reserve + "/" + strconv.FormatInt(n, 36), Typeflag: tar.TypeReg, Mode: 0o600, Format: tar.FormatPAX}); err != nil {
				return err
			}
		}
	}
	return nil
}

// inodeReserve sets up the placeholder inodes that give the image the
// same inode headroom as BuildExt4 (inodeCount). tar2ext4 sizes its inode
// tables to the inodes it writes, and resize2fs keeps the inodes per group,
// so without them a 1 GiB image of a small tree would have a few hundred
// inodes. The placeholders are empty files in one directory at the end of
// the stream; finish drops them again.
func (t *Tree) inodeReserve(sizeBytes int64) {
	want := inodeCount(sizeBytes, int64(len(t.f.md)))
	var blocks int64 = 64 // superblock, descriptors, lost+found, slack
	for _, m := range t.f.md {
		switch m.Type {
		case TypeRegular:
			blocks += roundUp(m.Size, blockSize)/blockSize + 1 // an extent block now and then
		case TypeDir:
			blocks++
		}
	}
	total := compactInodes(blocks, int64(len(t.f.md))+16, want, sizeBytes/blockSize)
	t.reserveN = max(total-int64(len(t.f.md))-16, 0)
	t.reserve = ".banger-inode-reserve"
	for n := 0; ; n++ {
		if _, ok := t.f.md[t.reserve]; !ok {
			break
		}
		t.reserve = ".banger-inode-reserve-" + strconv.Itoa(n)
	}
}

// tar2ext4's geometry (hcsshim ext4/internal/compactext4): 4 KiB blocks,
// 32768 blocks per group, 256-byte inodes, inodes per group a multiple of
// 16 up to 32768, chosen as the smallest that fits the inodes into the
// fewest groups.
const (
	compactBlocksPerGroup = 32768
	compactIPGStep        = 16
	compactMaxIPG         = 32768
)

// compactGroups is tar2ext4's choice of groups and inodes per group for
// blocks of data and inodes inodes.
func compactGroups(blocks, inodes int64) (groups, ipg int64) {
	groups = 1 << 62
	for i := int64(compactIPGStep); i <= compactMaxIPG; i += compactIPGStep {
		data := compactBlocksPerGroup - i*inodeSize/blockSize - 2
		b := max(blocks, (inodes-1)/i*data+1)
		if g := (b + data - 1) / data; g < groups {
			groups, ipg = g, i
		}
	}
	return groups, ipg
}

// compactInodes is how many inodes the compact image needs (have are the
// real ones) so that after resize2fs to finalBlocks, which keeps the
// inodes per group, the image has at least want (with a tenth more, for
// the estimate of blocks).
func compactInodes(blocks, have, want, finalBlocks int64) int64 {
	want += want / 10
	finalGroups := (finalBlocks + compactBlocksPerGroup - 1) / compactBlocksPerGroup
	for n := have; ; n += compactIPGStep {
		_, ipg := compactGroups(blocks, n)
		if ipg*finalGroups >= want || ipg == compactMaxIPG {
			return n
		}
	}
}

// emitLayer streams the bodies the final tree keeps from layer i.
func (t *Tree) emitLayer(ctx context.Context, src LayerSource, i int, l Layer, files map[int][]string, ordinal *int, tw *tar.Writer) (err error) {
	var rc io.ReadCloser
	if p := t.spool(i); p != "" {
		rc, err = openSpool(p)
	} else {
		rc, err = src.OpenLayer(ctx, i)
	}
	if err != nil {
		return fmt.Errorf("open layer %d (%s): %w", i, l.Digest, err)
	}
	defer func() {
		if cerr := rc.Close(); cerr != nil && (err == nil || errors.Is(cerr, ErrDigestMismatch)) {
			err = fmt.Errorf("layer %d (%s): %w", i, l.Digest, cerr)
		}
	}()
	tr := tar.NewReader(rc)
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
		*ordinal++
		paths, ok := files[*ordinal]
		if !ok {
			continue
		}
		h, err := t.header(paths[0])
		if err != nil {
			return err
		}
		if hdr.Size != h.Size || (hdr.Typeflag != tar.TypeReg && hdr.Typeflag != tar.TypeGNUSparse) {
			return fmt.Errorf("layer %d (%s): entry %q changed between the passes: %w", i, l.Digest, hdr.Name, ErrDigestMismatch)
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := io.CopyN(tw, tr, h.Size); err != nil {
			return fmt.Errorf("layer %d (%s): entry %q: %w", i, l.Digest, hdr.Name, err)
		}
		for _, extra := range paths[1:] {
			if err := tw.WriteHeader(&tar.Header{Name: extra, Typeflag: tar.TypeLink, Linkname: paths[0], Format: tar.FormatPAX}); err != nil {
				return err
			}
		}
	}
}

// WriteExt4 writes the tree, reading file bodies from the layer spools or
// else from src again, as an
// ext4 of sizeBytes at ext4Path (which must not exist; it is removed again
// on any failure): tar2ext4 into a compact image, then finish.
func (t *Tree) WriteExt4(ctx context.Context, src LayerSource, ext4Path string, sizeBytes int64) (retErr error) {
	defer t.Close()
	if sizeBytes%blockSize != 0 || sizeBytes <= 0 {
		return fmt.Errorf("write ext4 %q: size %d is not a positive multiple of %d", ext4Path, sizeBytes, blockSize)
	}
	for _, prog := range []string{"tune2fs", "resize2fs"} {
		if _, err := exec.LookPath(prog); err != nil {
			return fmt.Errorf("%s not found: %w", prog, ErrDirectUnsupported)
		}
	}
	t.inodeReserve(sizeBytes)
	out, err := os.OpenFile(ext4Path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("write ext4: create %q: %w", ext4Path, err)
	}
	defer func() {
		if cerr := out.Close(); retErr == nil && cerr != nil {
			retErr = fmt.Errorf("write ext4 %q: %w", ext4Path, cerr)
		}
		if retErr != nil {
			_ = os.Remove(ext4Path)
		}
	}()

	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		tw := tar.NewWriter(pw)
		err := t.emit(ctx, src, tw)
		if err == nil {
			err = tw.Close()
		}
		_ = pw.CloseWithError(err)
		done <- err
	}()
	cerr := tar2ext4.ConvertTarToExt4(pr, out, tar2ext4.MaximumDiskSize(sizeBytes))
	_ = pr.CloseWithError(errors.New("ext4 writer stopped"))
	perr := <-done
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("write ext4 %q: %w", ext4Path, ctx.Err())
	case perr != nil:
		return fmt.Errorf("write ext4 %q: %w", ext4Path, perr)
	case cerr != nil:
		return fmt.Errorf("write ext4 %q: tar2ext4: %w: %w", ext4Path, cerr, ErrDirectUnsupported)
	}
	if err := out.Truncate(sizeBytes); err != nil {
		return fmt.Errorf("write ext4: grow %q to %d: %w", ext4Path, sizeBytes, err)
	}
	if err := out.Sync(); err != nil {
		return fmt.Errorf("write ext4 %q: fsync: %w", ext4Path, err)
	}
	return t.finish(ctx, ext4Path, sizeBytes)
}

// finish turns tar2ext4's compact read-only image into a normal writable
// ext4 of sizeBytes with a journal: clear the read-only feature; drop the
// placeholder inodes (clri of their directory and unlink of its name, then
// e2fsck -fy clears the unattached empty inodes and recounts, which it
// reports as corrections: exit status 1); grow to sizeBytes; add the
// journal.
func (t *Tree) finish(ctx context.Context, ext4Path string, sizeBytes int64) error {
	run := func(ok func(int) bool, name string, args ...string) error {
		cmd := exec.CommandContext(ctx, name, args...) // #nosec G204 -- fixed programs; the arguments are a path and numbers
		cmd.Env = append(os.Environ(), "LC_ALL=C")
		var outb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &outb, &outb
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) && ok(ee.ExitCode()) {
			err = nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("finish ext4 %q: %w", ext4Path, ctx.Err())
			}
			return fmt.Errorf("finish ext4 %q: %s %s: %w: %s: %w", ext4Path, name, strings.Join(args[:len(args)-1], " "), err, strings.TrimSpace(outb.String()), ErrDirectUnsupported)
		}
		return nil
	}
	never := func(int) bool { return false }
	if err := run(never, "tune2fs", "-O", "^read-only", ext4Path); err != nil {
		return err
	}
	if t.reserveN > 0 {
		var s script
		s.add("clri", qpath("/"+t.reserve))
		s.add("unlink", qpath("/"+t.reserve))
		if _, err := runDebugfs(ctx, ext4Path, &s, true); err != nil {
			return fmt.Errorf("finish ext4: drop the inode reserve: %w: %w", err, ErrDirectUnsupported)
		}
		if err := run(func(c int) bool { return c == 1 }, "e2fsck", "-fy", ext4Path); err != nil {
			return err
		}
	}
	if err := run(never, "resize2fs", "-f", ext4Path, strconv.FormatInt(sizeBytes/1024, 10)+"K"); err != nil {
		return err
	}
	return run(never, "tune2fs", "-O", "has_journal", ext4Path)
}

// POSIX ACL tags (linux/posix_acl.h).
const (
	aclUserObj  = 0x01
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclGroup    = 0x08
	aclMask     = 0x10
	aclOther    = 0x20
)

// aclToDisk converts a POSIX ACL from the xattr format that tar carries
// (version 2, 8-byte entries) to ext4's on-disk format (version 1, 4-byte
// entries except for named users and groups), which e2fsprogs and the
// kernel convert between and tar2ext4 does not.
func aclToDisk(v []byte) ([]byte, error) {
	if len(v) < 4 || (len(v)-4)%8 != 0 || binary.LittleEndian.Uint32(v) != 2 {
		return nil, errors.New("not a version 2 POSIX ACL")
	}
	out := binary.LittleEndian.AppendUint32(nil, 1)
	for e := v[4:]; len(e) > 0; e = e[8:] {
		tag, perm, id := binary.LittleEndian.Uint16(e), binary.LittleEndian.Uint16(e[2:]), binary.LittleEndian.Uint32(e[4:])
		out = binary.LittleEndian.AppendUint16(out, tag)
		out = binary.LittleEndian.AppendUint16(out, perm)
		switch tag {
		case aclUser, aclGroup:
			out = binary.LittleEndian.AppendUint32(out, id)
		case aclUserObj, aclGroupObj, aclMask, aclOther:
		default:
			return nil, fmt.Errorf("POSIX ACL tag %#x", tag)
		}
	}
	return out, nil
}

// InspectTree is InspectGuest for a tree that was never extracted: it
// lays out a skeleton of the tree under dir (which must exist and be
// empty) — every directory and symlink, and empty stand-ins with the right
// mode for the executables and the sshd host key, which is all that
// InspectGuest reads — inspects it and removes it again.
func (t *Tree) InspectTree(dir string) (GuestFacts, error) {
	defer func() {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			_ = os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}()
	root, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return GuestFacts{}, fmt.Errorf("inspect image: %w", err)
	}
	defer unix.Close(root)
	keys := make([]string, 0, len(t.f.md))
	for k, m := range t.f.md {
		if k != "" && (m.Type == TypeDir || m.Type == TypeSymlink || m.Type == TypeRegular && (m.Mode&0o111 != 0 || strings.Contains(k, "ssh"))) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		m := t.f.md[k]
		parent, base := split(k)
		pfd, err := openBeneath(root, parent)
		if err != nil {
			return GuestFacts{}, fmt.Errorf("inspect image: %w", err)
		}
		switch m.Type {
		case TypeDir:
			err = unix.Mkdirat(pfd, base, 0o700)
		case TypeSymlink:
			err = unix.Symlinkat(t.f.extra[k].link, pfd, base)
		default:
			var fd int
			fd, err = unix.Openat(pfd, base, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o700)
			if err == nil {
				err = unix.Fchmod(fd, uint32(m.Mode.Perm()&0o711|0o600))
				_ = unix.Close(fd)
			}
		}
		_ = unix.Close(pfd)
		if err != nil {
			return GuestFacts{}, fmt.Errorf("inspect image: %s: %w", k, err)
		}
	}
	return InspectGuest(dir), nil
}
