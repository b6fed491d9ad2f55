// Package initramfs generates the small initramfs banger boots kernels
// whose virtio drivers are modules with: a newc cpio, gzip- or
// zstd-compressed, holding the project's static init (cmd/banger-init) as
// /init and only the modules that init must load, with a list file giving
// their load order.
//
// Layout inside the archive:
//
//	/init                         the banger-init binary
//	/dev/console                  char 5:1, so the kernel gives init a console
//	/dev, /proc, /sys, /newroot   mount points
//	/etc/banger/modules           load order: one path per line, relative to /
//	/lib/modules/<version>/...    the modules, uncompressed (.ko)
//
// Modules shipped compressed (.ko.xz, .ko.zst, .ko.gz) are decompressed at
// generation time, so the init never depends on the kernel's in-kernel
// module decompression (CONFIG_MODULE_DECOMPRESS).
package initramfs

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// ModulesListPath is where the load-order list lives in the archive
// (guestabi.ModulesList, relative).
// cmd/banger-init reads the same path.
var ModulesListPath = strings.TrimPrefix(guestabi.ModulesList, "/")

// Compression names.
const (
	Gzip = "gzip"
	Zstd = "zstd"
	None = "none"
)

// Options says what to put in the initramfs.
type Options struct {
	// ModulesDir is a depmod'ed lib/modules/<version> tree. Empty means a
	// kernel with everything built in: the archive holds only the init.
	ModulesDir string
	// Version is the kernel release; default: the base name of ModulesDir.
	Version string
	// InitBinary is the path of the static banger-init binary (required).
	InitBinary string
	// Modules to load, dependencies added; nil means DefaultModules.
	Modules []string
	// Compression is Gzip (default), Zstd or None.
	Compression string
}

// Info describes a generated initramfs.
type Info struct {
	Modules     []Module // in load order
	Compression string
	Size        int64  // compressed size in bytes
	SHA256      string // of the compressed archive
}

// Generate writes the initramfs opts describes to w.
func Generate(ctx context.Context, w io.Writer, opts Options) (Info, error) {
	info := Info{Compression: opts.Compression}
	if info.Compression == "" {
		info.Compression = Gzip
	}
	if opts.InitBinary == "" {
		return info, errors.New("generate initramfs: no init binary given (build cmd/banger-init)")
	}
	initData, err := os.ReadFile(opts.InitBinary)
	if err != nil {
		return info, fmt.Errorf("generate initramfs: read init binary: %w", err)
	}
	if len(initData) < 4 || string(initData[:4]) != "\x7fELF" {
		return info, fmt.Errorf("generate initramfs: init binary %s is not an ELF executable", opts.InitBinary)
	}
	version := opts.Version
	if version == "" && opts.ModulesDir != "" {
		version = filepath.Base(opts.ModulesDir)
	}
	if opts.ModulesDir != "" {
		names := opts.Modules
		if names == nil {
			names = DefaultModules
		}
		info.Modules, err = ResolveModules(opts.ModulesDir, names)
		if err != nil {
			return info, fmt.Errorf("generate initramfs: %w", err)
		}
		if opts.Modules == nil {
			if info.Modules, err = addOptional(opts.ModulesDir, info.Modules, OptionalModules); err != nil {
				return info, fmt.Errorf("generate initramfs: %w", err)
			}
		}
	}

	h := sha256.New()
	counter := &countWriter{w: io.MultiWriter(w, h)}
	var comp io.WriteCloser
	switch info.Compression {
	case Gzip:
		comp, err = gzip.NewWriterLevel(counter, gzip.DefaultCompression)
	case Zstd:
		comp, err = zstd.NewWriter(counter)
	case None:
		comp = nopCloser{counter}
	default:
		return info, fmt.Errorf("generate initramfs: unknown compression %q (want %s, %s or %s)", info.Compression, Gzip, Zstd, None)
	}
	if err != nil {
		return info, fmt.Errorf("generate initramfs: %w", err)
	}
	cw := NewWriter(comp)
	for _, d := range []string{"dev", "proc", "sys", "newroot", "etc", "etc/banger"} {
		if err := cw.Dir(d, 0o755); err != nil {
			return info, err
		}
	}
	if err := cw.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return info, err
	}
	if err := cw.File("init", 0o755, initData); err != nil {
		return info, err
	}
	var list bytes.Buffer
	list.WriteString("# banger-init module load order, one path per line\n")
	if len(info.Modules) > 0 {
		if err := checkVersion(version); err != nil {
			return info, err
		}
		base := path.Join("lib/modules", version)
		dirs := map[string]bool{}
		for _, m := range info.Modules {
			for d := path.Dir(path.Join(base, ko(m.Path))); d != "." && !dirs[d]; d = path.Dir(d) {
				dirs[d] = true
			}
		}
		sorted := make([]string, 0, len(dirs))
		for d := range dirs {
			sorted = append(sorted, d)
		}
		sort.Strings(sorted) // a parent sorts before its children
		for _, d := range sorted {
			if err := cw.Dir(d, 0o755); err != nil {
				return info, err
			}
		}
		for _, m := range info.Modules {
			if err := ctx.Err(); err != nil {
				return info, err
			}
			data, err := readModule(filepath.Join(opts.ModulesDir, filepath.FromSlash(m.Path)))
			if err != nil {
				return info, fmt.Errorf("generate initramfs: module %s: %w", m.Name, err)
			}
			dst := path.Join(base, ko(m.Path))
			if err := cw.File(dst, 0o644, data); err != nil {
				return info, err
			}
			list.WriteString("/" + dst + "\n")
		}
	}
	if err := cw.File(ModulesListPath, 0o644, list.Bytes()); err != nil {
		return info, err
	}
	if err := cw.Close(); err != nil {
		return info, err
	}
	if err := comp.Close(); err != nil {
		return info, fmt.Errorf("generate initramfs: finish %s stream: %w", info.Compression, err)
	}
	info.Size = counter.n
	info.SHA256 = hex.EncodeToString(h.Sum(nil))
	return info, nil
}

// GenerateFile writes the initramfs to path atomically (temporary file,
// fsync, rename).
func GenerateFile(ctx context.Context, path string, opts Options) (Info, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return Info{}, fmt.Errorf("generate initramfs %s: %w", path, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	info, err := Generate(ctx, f, opts)
	if err != nil {
		return info, err
	}
	if err := f.Chmod(0o644); err != nil {
		return info, err
	}
	if err := f.Sync(); err != nil {
		return info, fmt.Errorf("generate initramfs %s: fsync: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return info, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return info, fmt.Errorf("generate initramfs %s: %w", path, err)
	}
	ok = true
	return info, nil
}

// ko strips a compression suffix: modules are stored decompressed.
func ko(p string) string {
	for _, suf := range []string{".xz", ".zst", ".gz"} {
		if strings.HasSuffix(p, ".ko"+suf) {
			return strings.TrimSuffix(p, suf)
		}
	}
	return p
}

// readModule reads a module file, decompressing .ko.xz/.ko.zst/.ko.gz.
func readModule(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var r io.Reader = f
	switch {
	case strings.HasSuffix(p, ".ko.xz"):
		xr, err := xz.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("xz: %w", err)
		}
		r = xr
	case strings.HasSuffix(p, ".ko.zst"):
		zr, err := zstd.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		defer zr.Close()
		r = zr
	case strings.HasSuffix(p, ".ko.gz"):
		gr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
		r = gr
	}
	data, err := io.ReadAll(io.LimitReader(r, 256<<20))
	if err != nil {
		return nil, err
	}
	if len(data) < 4 || string(data[:4]) != "\x7fELF" {
		return nil, fmt.Errorf("%s is not an ELF module", p)
	}
	return data, nil
}

func checkVersion(v string) error {
	if v == "" || v == "." || v == ".." || strings.ContainsAny(v, "/ \n") {
		return fmt.Errorf("generate initramfs: kernel release %q is not a valid directory name", v)
	}
	return nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }
