package kernels

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// ErrBadPackage is returned for a .deb that is malformed or holds no
// usable kernel.
var ErrBadPackage = errors.New("not a usable linux-image package")

// maxExtract bounds what one package may expand to, against decompression bombs.
const maxExtract = 8 << 30

// arReader reads the members of a Unix ar archive (the .deb container).
type arReader struct {
	r      *bufio.Reader
	remain int64 // bytes of the current member not yet read
	pad    bool  // the current member is followed by a padding byte
}

func newArReader(r io.Reader) (*arReader, error) {
	br := bufio.NewReader(r)
	magic := make([]byte, 8)
	if _, err := io.ReadFull(br, magic); err != nil {
		return nil, fmt.Errorf("read ar magic: %w", err)
	}
	if string(magic) != "!<arch>\n" {
		return nil, fmt.Errorf("no ar magic: %w", ErrBadPackage)
	}
	return &arReader{r: br}, nil
}

// Next skips to the next member and returns its name and size.
func (a *arReader) Next() (string, int64, error) {
	skip := a.remain
	if a.pad {
		skip++
	}
	if _, err := io.CopyN(io.Discard, a.r, skip); err != nil {
		return "", 0, fmt.Errorf("skip ar member: %w", err)
	}
	hdr := make([]byte, 60)
	if _, err := io.ReadFull(a.r, hdr); err != nil {
		if errors.Is(err, io.EOF) {
			return "", 0, io.EOF
		}
		return "", 0, fmt.Errorf("read ar header: %w", err)
	}
	if string(hdr[58:60]) != "`\n" {
		return "", 0, fmt.Errorf("bad ar header terminator: %w", ErrBadPackage)
	}
	name := strings.TrimRight(strings.TrimSpace(string(hdr[0:16])), "/")
	size, err := strconv.ParseInt(strings.TrimSpace(string(hdr[48:58])), 10, 64)
	if err != nil || size < 0 {
		return "", 0, fmt.Errorf("bad ar member size %q: %w", hdr[48:58], ErrBadPackage)
	}
	a.remain, a.pad = size, size%2 == 1
	return name, size, nil
}

// Read reads from the current member.
func (a *arReader) Read(p []byte) (int, error) {
	if a.remain <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > a.remain {
		p = p[:a.remain]
	}
	n, err := a.r.Read(p)
	a.remain -= int64(n)
	if errors.Is(err, io.EOF) && a.remain > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// debContents is what extractDeb found in a linux-image package.
type debContents struct {
	Version    string // kernel release, from boot/vmlinuz-<version>
	Kernel     string // <root>/boot/vmlinuz-<version>
	Config     string // <root>/boot/config-<version>, "" when absent
	ModulesDir string // <root>/lib/modules/<version>, "" when absent
}

// extractDeb unpacks the kernel, its config and its modules tree from the
// Debian package at debPath into root (as root/boot/... and
// root/lib/modules/...). Member paths are untrusted: only regular files and
// directories under boot/ and (usr/)lib/modules/ are written, with clean
// relative names.
func extractDeb(ctx context.Context, debPath, root string) (debContents, error) {
	f, err := os.Open(debPath)
	if err != nil {
		return debContents{}, fmt.Errorf("open package: %w", err)
	}
	defer f.Close()
	ar, err := newArReader(f)
	if err != nil {
		return debContents{}, err
	}
	for {
		name, _, err := ar.Next()
		if errors.Is(err, io.EOF) {
			return debContents{}, fmt.Errorf("no data.tar member: %w", ErrBadPackage)
		}
		if err != nil {
			return debContents{}, err
		}
		if !strings.HasPrefix(name, "data.tar") {
			continue
		}
		dr, closeFn, err := decompressor(name, ar)
		if err != nil {
			return debContents{}, err
		}
		defer closeFn()
		return extractKernelTar(ctx, tar.NewReader(dr), root)
	}
}

// decompressor wraps r by the compression its member name says.
func decompressor(name string, r io.Reader) (io.Reader, func(), error) {
	switch path.Ext(name) {
	case ".xz":
		xr, err := xz.NewReader(bufio.NewReaderSize(r, 1<<20))
		if err != nil {
			return nil, nil, fmt.Errorf("open %s: %w", name, err)
		}
		return xr, func() {}, nil
	case ".zst":
		zr, err := zstd.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("open %s: %w", name, err)
		}
		return zr, zr.Close, nil
	case ".gz":
		gr, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("open %s: %w", name, err)
		}
		return gr, func() { _ = gr.Close() }, nil
	case ".tar":
		return r, func() {}, nil
	}
	return nil, nil, fmt.Errorf("member %s: unsupported compression: %w", name, ErrBadPackage)
}

func extractKernelTar(ctx context.Context, tr *tar.Reader, root string) (debContents, error) {
	var c debContents
	var total int64
	var kernels []string
	for {
		if err := ctx.Err(); err != nil {
			return c, err
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return c, fmt.Errorf("read data.tar: %w", err)
		}
		rel, ok := cleanMemberPath(h.Name)
		if !ok {
			return c, fmt.Errorf("member %q: unsafe path: %w", h.Name, ErrBadPackage)
		}
		rel = strings.TrimPrefix(rel, "usr/")
		var keep bool
		switch {
		case strings.HasPrefix(rel, "boot/vmlinuz-"), strings.HasPrefix(rel, "boot/config-"):
			keep = h.Typeflag == tar.TypeReg && strings.Count(rel, "/") == 1
		case rel == "lib/modules" || strings.HasPrefix(rel, "lib/modules/"):
			keep = h.Typeflag == tar.TypeReg || h.Typeflag == tar.TypeDir
		}
		if !keep {
			continue
		}
		if err := checkName(rel); err != nil {
			return c, fmt.Errorf("member %q: %w", h.Name, err)
		}
		dst := filepath.Join(root, filepath.FromSlash(rel))
		if h.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return c, err
			}
			continue
		}
		total += h.Size
		if total > maxExtract {
			return c, fmt.Errorf("package expands past %d bytes: %w", int64(maxExtract), ErrBadPackage)
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return c, err
		}
		mode := os.FileMode(0o644)
		if h.Mode&0o111 != 0 {
			mode = 0o755
		}
		if err := writeFile(dst, io.LimitReader(tr, h.Size), mode); err != nil {
			return c, err
		}
		if strings.HasPrefix(rel, "boot/vmlinuz-") {
			kernels = append(kernels, strings.TrimPrefix(rel, "boot/vmlinuz-"))
		}
	}
	if len(kernels) != 1 {
		return c, fmt.Errorf("package holds %d boot/vmlinuz-* files, want exactly one: %w", len(kernels), ErrBadPackage)
	}
	c.Version = kernels[0]
	if err := checkVersion(c.Version); err != nil {
		return c, err
	}
	c.Kernel = filepath.Join(root, "boot", "vmlinuz-"+c.Version)
	if _, err := os.Stat(filepath.Join(root, "boot", "config-"+c.Version)); err == nil {
		c.Config = filepath.Join(root, "boot", "config-"+c.Version)
	}
	if st, err := os.Stat(filepath.Join(root, "lib", "modules", c.Version)); err == nil && st.IsDir() {
		c.ModulesDir = filepath.Join(root, "lib", "modules", c.Version)
	}
	return c, nil
}

// cleanMemberPath turns an archive member name into a clean relative
// slash path, refusing absolute paths and any ".." component.
func cleanMemberPath(name string) (string, bool) {
	name = strings.TrimPrefix(name, "./")
	if name == "" || name == "." {
		return ".", true
	}
	if strings.HasPrefix(name, "/") {
		return "", false
	}
	for _, part := range strings.Split(strings.TrimSuffix(name, "/"), "/") {
		if part == ".." {
			return "", false
		}
	}
	c := path.Clean(name)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", false
	}
	return c, true
}

// ErrUnsafeName is returned for a file name banger refuses to write into
// an image: control bytes cannot be passed to debugfs safely.
var ErrUnsafeName = errors.New("name holds a control byte")

// checkName refuses names holding bytes below 0x20 or 0x7f.
func checkName(name string) error {
	for i := 0; i < len(name); i++ {
		if name[i] < 0x20 || name[i] == 0x7f {
			return fmt.Errorf("%q: %w", name, ErrUnsafeName)
		}
	}
	return nil
}

// checkVersion accepts a kernel release usable as one path component.
func checkVersion(v string) error {
	if v == "" || v == "." || v == ".." || len(v) > 128 || strings.ContainsAny(v, "/ ") {
		return fmt.Errorf("kernel release %q is not a valid directory name: %w", v, ErrBadPackage)
	}
	if err := checkName(v); err != nil {
		return fmt.Errorf("kernel release: %w", err)
	}
	return nil
}

// writeFile creates path exclusively and copies r into it. Callers sync
// the whole staging file system once (syncDir) before publishing.
func writeFile(path string, r io.Reader, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r); err != nil {
		_ = f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}
