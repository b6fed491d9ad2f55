package daemon

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/store"
)

// maxUpload bounds what a kernel import may upload.
const maxUpload = 4 << 30

// handleKernelImport imports a kernel whose files the CLI uploads as a tar
// stream: "kernel" [+ "initrd"] [+ "modules/..."], or "package.deb". The
// daemon never opens a path the client names, so a caller cannot make it
// read files the caller could not read itself.
func (d *Daemon) handleKernelImport(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	name, force := q.Get("name"), q.Get("force") == "true"
	if err := model.ValidateName("kernel", name); err != nil {
		d.writeError(w, r, api.Errorf(api.CodeInvalid, "%v", err))
		return
	}
	if !CallerFrom(r.Context()).Root() {
		d.writeError(w, r, api.Errorf(api.CodeForbidden, "importing kernels needs root: kernels are shared by every user of this host"))
		return
	}
	if _, err := d.store.GetKernel(name); err == nil && !force {
		d.writeError(w, r, api.Errorf(api.CodeConflict, "kernel %q already exists: pass --force to replace it", name))
		return
	}
	upload, err := os.MkdirTemp(d.cfg.KernelsDir(), ".upload-")
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	defer os.RemoveAll(upload)
	// HTTP/1 handlers must read the body before they answer.
	if err := receiveTar(io.LimitReader(r.Body, maxUpload+1), upload, maxUpload); err != nil {
		d.writeError(w, r, err)
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return d.importKernel(ctx, name, upload, force, report)
	})
}

// importKernel builds every path from name, which handleKernelImport
// checked with model.ValidateName, under the kernels dir.
//
//nolint:gosec // G703: see above; the taint analysis cannot see the validation
func (d *Daemon) importKernel(ctx context.Context, name, upload string, force bool, report progress.Func) (model.Kernel, error) {
	// name passed model.ValidateName: no separators, no dots at the start.
	dst := filepath.Join(d.cfg.KernelsDir(), name)
	tmpDst := filepath.Join(d.cfg.KernelsDir(), ".new-"+name+"-"+newID()[:8])
	var (
		k   model.Kernel
		err error
	)
	deb := filepath.Join(upload, "package.deb")
	if _, serr := os.Stat(deb); serr == nil {
		initBin, ferr := findHelper(d.cfg.InitBinary, "banger-init", "init_binary")
		if ferr != nil {
			return k, ferr
		}
		k, err = kernels.ImportDeb(ctx, tmpDst, name, deb, kernels.DebOptions{InitBinary: initBin, Progress: report})
	} else {
		kernel := filepath.Join(upload, "kernel")
		if _, serr := os.Stat(kernel); serr != nil {
			return k, api.Errorf(api.CodeInvalid, "the upload holds no kernel: pass --kernel FILE or --deb FILE")
		}
		initrd, mods := filepath.Join(upload, "initrd"), ""
		if _, serr := os.Stat(initrd); serr != nil {
			initrd = ""
		}
		if entries, _ := os.ReadDir(filepath.Join(upload, "modules")); len(entries) == 1 && entries[0].IsDir() {
			mods = filepath.Join(upload, "modules", entries[0].Name())
		} else if len(entries) > 1 {
			return k, api.Errorf(api.CodeInvalid, "--modules must be one lib/modules/<version> directory")
		}
		report.Report(progress.Event{Phase: "import", Item: name})
		k, err = kernels.AdoptFiles(ctx, tmpDst, name, kernel, initrd, mods)
	}
	if err != nil {
		_ = os.RemoveAll(tmpDst)
		if errors.Is(err, kernels.ErrUnknownFormat) {
			return k, api.Errorf(api.CodeInvalid, "%v", err)
		}
		return k, err
	}
	// Move into place, replacing an old kernel when forced.
	old := ""
	if _, serr := os.Stat(dst); serr == nil {
		if !force {
			_ = os.RemoveAll(tmpDst)
			return k, api.Errorf(api.CodeConflict, "kernel %q already exists: pass --force to replace it", name)
		}
		old = dst + ".old-" + newID()[:8]
		if err := os.Rename(dst, old); err != nil {
			_ = os.RemoveAll(tmpDst)
			return k, err
		}
	}
	if err := os.Rename(tmpDst, dst); err != nil {
		_ = os.RemoveAll(tmpDst)
		return k, err
	}
	k = rebaseKernel(k, tmpDst, dst)
	k.Created = time.Now().UTC()
	if err := d.store.PutKernel(k, force); err != nil {
		_ = os.RemoveAll(dst)
		if errors.Is(err, store.ErrConflict) {
			return k, api.Errorf(api.CodeConflict, "kernel %q already exists: pass --force to replace it", name)
		}
		return k, err
	}
	if old != "" {
		_ = os.RemoveAll(old)
	}
	d.log.Info("kernel imported", "kernel", name, "version", k.Version, "format", k.Format)
	return k, nil
}

// rebaseKernel rewrites the artifact paths of k from dir from to dir to.
func rebaseKernel(k model.Kernel, from, to string) model.Kernel {
	re := func(p string) string {
		if rel, err := filepath.Rel(from, p); err == nil && !strings.HasPrefix(rel, "..") {
			return filepath.Join(to, rel)
		}
		return p
	}
	k.Dir = to
	k.Kernel.Path = re(k.Kernel.Path)
	if k.Initrd != nil {
		a := *k.Initrd
		a.Path = re(a.Path)
		k.Initrd = &a
	}
	if k.Modules != nil {
		a := *k.Modules
		a.Path = re(a.Path)
		k.Modules = &a
	}
	return k
}

// receiveTar unpacks an upload into dir. It takes only regular files and
// directories under the names the import protocol defines, with clean
// relative paths; anything else is refused.
func receiveTar(r io.Reader, dir string, limit int64) error {
	tr := tar.NewReader(r)
	var total int64
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return api.Errorf(api.CodeInvalid, "read upload: %v", err)
		}
		name := h.Name
		clean := path.Clean(name)
		if clean != strings.TrimSuffix(name, "/") || strings.HasPrefix(clean, "/") || clean == ".." || strings.HasPrefix(clean, "../") || strings.Contains(clean, "/../") {
			return api.Errorf(api.CodeInvalid, "upload entry %q is not a clean relative path", name)
		}
		for _, c := range []byte(clean) {
			if c < 0x20 || c == 0x7f {
				return api.Errorf(api.CodeInvalid, "upload entry %q has a control byte in its name", name)
			}
		}
		top, _, _ := strings.Cut(clean, "/")
		switch top {
		case "kernel", "initrd", "package.deb", "modules":
		default:
			return api.Errorf(api.CodeInvalid, "upload entry %q is not part of a kernel import", name)
		}
		dst := filepath.Join(dir, filepath.FromSlash(clean))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			total += h.Size
			if total > limit {
				return api.Errorf(api.CodeInvalid, "upload is larger than %d bytes", limit)
			}
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
			if err != nil {
				return fmt.Errorf("receive %s: %w", clean, err)
			}
			_, err = io.CopyN(f, tr, h.Size)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("receive %s: %w", clean, err)
			}
		default:
			return api.Errorf(api.CodeInvalid, "upload entry %q has type %q: only files and directories are accepted", name, string(h.Typeflag))
		}
	}
}

// recoverKernelLeftovers removes partial imports left by a crash.
func recoverKernelLeftovers(_ context.Context, d *Daemon) error {
	for _, pat := range []string{".upload-*", ".new-*", "*.old-*"} {
		m, _ := filepath.Glob(filepath.Join(d.cfg.KernelsDir(), pat))
		for _, p := range m {
			if err := os.RemoveAll(p); err == nil {
				d.log.Info("removed leftover of an interrupted kernel import", "path", p)
			}
		}
	}
	if removed, err := kernels.RemoveStale(d.cfg.KernelsDir()); err == nil {
		for _, p := range removed {
			d.log.Info("removed leftover kernel staging dir", "path", p)
		}
	}
	return nil
}
