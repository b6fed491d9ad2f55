package kernelcat

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"

	dl "github.com/bangerdev/banger/internal/download"
	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
)

// Pull downloads entry's artifacts into cacheDir (as <sha256>, while
// downloading <sha256>.partial, resumed with HTTP Range on a later
// attempt), verifies each sha256, and only then publishes the kernel at
// dstDir atomically (see kernels.AdoptFiles). On a sha mismatch nothing is
// published and the bad download is deleted. Verified downloads stay in
// cacheDir for the next pull; callers may delete them.
func Pull(ctx context.Context, entry Entry, dstDir, cacheDir string, pf progress.Func) (model.Kernel, error) {
	if err := entry.Validate(); err != nil {
		return model.Kernel{}, fmt.Errorf("pull kernel: %w", err)
	}
	for _, f := range entry.files() {
		if u, err := url.Parse(f.URL); err != nil || dl.Family(u.Scheme) == "" {
			return model.Kernel{}, fmt.Errorf("pull kernel %q: url %q: %w", entry.Name, f.URL, ErrBadScheme)
		}
	}
	if _, err := os.Lstat(dstDir); err == nil {
		return model.Kernel{}, fmt.Errorf("pull kernel %q: %s: %w", entry.Name, dstDir, kernels.ErrExists)
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return model.Kernel{}, fmt.Errorf("pull kernel %q: %w", entry.Name, err)
	}
	fetch := func(item string, f *File) (string, error) {
		if f == nil {
			return "", nil
		}
		p, err := download(ctx, *f, cacheDir, item, pf)
		if err != nil {
			return "", fmt.Errorf("pull kernel %q: %s: %w", entry.Name, item, err)
		}
		return p, nil
	}
	kernelPath, err := fetch("kernel", &entry.Kernel)
	if err != nil {
		return model.Kernel{}, err
	}
	initrdPath, err := fetch("initrd", entry.Initrd)
	if err != nil {
		return model.Kernel{}, err
	}
	modulesTar, err := fetch("modules", entry.Modules)
	if err != nil {
		return model.Kernel{}, err
	}
	format, version, err := kernels.DetectFormat(kernelPath)
	if err != nil {
		return model.Kernel{}, fmt.Errorf("pull kernel %q: %w", entry.Name, err)
	}
	if (entry.Format != "" && format != entry.Format) || (version != "" && version != entry.Version) {
		return model.Kernel{}, fmt.Errorf("pull kernel %q: the image is a %s of release %q, the index says %s %q: %w",
			entry.Name, format, version, entry.Format, entry.Version, ErrBadIndex)
	}
	var modulesDir string
	if modulesTar != "" {
		tmp, err := os.MkdirTemp(cacheDir, "modules-*")
		if err != nil {
			return model.Kernel{}, err
		}
		defer os.RemoveAll(tmp)
		modulesDir = filepath.Join(tmp, entry.Version)
		pf.Report(progress.Event{Phase: "extract", Item: "modules"})
		if err := extractModules(ctx, modulesTar, modulesDir); err != nil {
			return model.Kernel{}, fmt.Errorf("pull kernel %q: modules: %w", entry.Name, err)
		}
	}
	pf.Report(progress.Event{Phase: "publish", Item: entry.Name})
	k, err := kernels.AdoptFiles(ctx, dstDir, entry.Name, kernelPath, initrdPath, modulesDir)
	if err != nil {
		return model.Kernel{}, fmt.Errorf("pull kernel %q: %w", entry.Name, err)
	}
	k.Source, k.SourceRef = kernels.SourceCatalog, entry.Kernel.URL
	pf.Report(progress.Event{Phase: "publish", Item: entry.Name, Done: true})
	return k, nil
}

// download fetches f into cacheDir/<sha256> (download.Fetch: resumed from
// <sha256>.partial, verified before the rename) and returns that path.
func download(ctx context.Context, f File, cacheDir, item string, pf progress.Func) (string, error) {
	final := filepath.Join(cacheDir, f.SHA256)
	err := dl.Fetch(ctx, dl.File{URL: f.URL, SHA256: f.SHA256, Size: f.Size}, final,
		dl.Options{Mode: 0o644, Item: item, Progress: pf})
	if err != nil {
		return "", err
	}
	return final, nil
}

// extractModules unpacks a verified modules tarball (gzip or zstd, sniffed)
// into dst. Member names are still checked: plain files and directories
// only, relative, no "..", no control bytes.
func extractModules(ctx context.Context, tarball, dst string) error {
	f, err := os.Open(tarball)
	if err != nil {
		return err
	}
	defer f.Close()
	br := bufio.NewReader(f)
	magic, _ := br.Peek(4)
	var r io.Reader
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		gr, err := gzip.NewReader(br)
		if err != nil {
			return err
		}
		r = gr
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br)
		if err != nil {
			return err
		}
		defer zr.Close()
		r = zr
	default:
		return errors.New("modules artifact is neither gzip nor zstd")
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	tr := tar.NewReader(r)
	var total int64
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read modules tar: %w", err)
		}
		name := strings.TrimPrefix(h.Name, "./")
		if name == "" || name == "." {
			continue
		}
		clean := path.Clean(strings.TrimSuffix(name, "/"))
		if strings.HasPrefix(name, "/") || clean == ".." || strings.HasPrefix(clean, "../") || strings.Contains(name, "/../") {
			return fmt.Errorf("member %q: unsafe path", h.Name)
		}
		for i := 0; i < len(clean); i++ {
			if clean[i] < 0x20 || clean[i] == 0x7f {
				return fmt.Errorf("member %q: control byte in name", h.Name)
			}
		}
		target := filepath.Join(dst, filepath.FromSlash(clean))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(target, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			total += h.Size
			if total > maxArtifactBytes {
				return errors.New("modules tar expands past the size limit")
			}
			if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
				return err
			}
			out, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				return err
			}
			_, err = io.Copy(out, io.LimitReader(tr, h.Size))
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("extract %s: %w", clean, err)
			}
		default:
			return fmt.Errorf("member %q: type %q not allowed in a modules tar", h.Name, h.Typeflag)
		}
	}
}

// Catalog is a configured kernel catalog, ready to plug into
// kernels.ResolveKernelInputs. Pulled kernels are published at
// <KernelsDir>/<name>.
type Catalog struct {
	IndexURL   string
	KernelsDir string
	CacheDir   string
	Progress   progress.Func
}

// CatalogNames implements kernels.Catalog.
func (c *Catalog) CatalogNames(ctx context.Context) ([]string, error) {
	ix, err := Fetch(ctx, c.IndexURL)
	if err != nil {
		return nil, err
	}
	return ix.Names(), nil
}

// PullKernel implements kernels.Catalog.
func (c *Catalog) PullKernel(ctx context.Context, name string) (model.Kernel, error) {
	if err := model.ValidateName("kernel", name); err != nil {
		return model.Kernel{}, err
	}
	ix, err := Fetch(ctx, c.IndexURL)
	if err != nil {
		return model.Kernel{}, err
	}
	e, ok := ix.Lookup(name)
	if !ok {
		return model.Kernel{}, fmt.Errorf("kernel catalog %s: %q: %w", c.IndexURL, name, kernels.ErrNotInCatalog)
	}
	return Pull(ctx, e, filepath.Join(c.KernelsDir, name), c.CacheDir, c.Progress)
}

var _ kernels.Catalog = (*Catalog)(nil)
