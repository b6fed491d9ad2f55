package images

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
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
	"github.com/bangerdev/banger/internal/subpath"
)

// maxUpload bounds what a kernel import may upload.
const maxUpload = 4 << 30

// CheckKernelImport refuses a kernel import that cannot start: a bad name,
// or a kernel of that name without force.
func (s *Service) CheckKernelImport(name string, force bool) error {
	if err := model.ValidateName("kernel", name); err != nil {
		return api.Errorf(api.CodeInvalid, "%v", err)
	}
	if _, err := s.store.GetKernel(name); err == nil && !force {
		return api.Errorf(api.CodeConflict, "kernel %q already exists: pass --force to replace it", name)
	}
	return nil
}

// ReceiveUpload unpacks a kernel import's upload, a tar stream of
// "kernel" [+ "initrd"] [+ "modules/..."] or "package.deb", into a fresh dir
// under the kernels dir, which the caller removes. The daemon never opens a
// path the client names, so a caller cannot make it read files the caller
// could not read itself.
func (s *Service) ReceiveUpload(r io.Reader) (string, error) {
	upload, err := os.MkdirTemp(s.cfg.KernelsDir(), ".upload-")
	if err != nil {
		return "", err
	}
	if err := receiveTar(io.LimitReader(r, maxUpload+1), upload, maxUpload); err != nil {
		_ = os.RemoveAll(upload)
		return "", err
	}
	return upload, nil
}

// ImportKernel imports the kernel of an upload (ReceiveUpload) as name.
// It builds every path from name, which CheckKernelImport checked with
// model.ValidateName, under the kernels dir.
//
//nolint:gosec // G703: see above; the taint analysis cannot see the validation
func (s *Service) ImportKernel(ctx context.Context, name, upload string, force bool, report progress.Func) (model.Kernel, error) {
	// name passed model.ValidateName: no separators, no dots at the start.
	dst := filepath.Join(s.cfg.KernelsDir(), name)
	tmpDst := filepath.Join(s.cfg.KernelsDir(), ".new-"+name+"-"+model.NewID()[:8])
	var (
		k   model.Kernel
		err error
	)
	deb := filepath.Join(upload, "package.deb")
	if _, serr := os.Stat(deb); serr == nil {
		initBin, ferr := findHelper(s.cfg.InitBinary, "banger-init", "init_binary")
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
		old = dst + ".old-" + model.NewID()[:8]
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
	if err := s.store.PutKernel(k, force); err != nil {
		_ = os.RemoveAll(dst)
		if errors.Is(err, store.ErrConflict) {
			return k, api.Errorf(api.CodeConflict, "kernel %q already exists: pass --force to replace it", name)
		}
		return k, err
	}
	if old != "" {
		_ = os.RemoveAll(old)
	}
	s.log.Info("kernel imported", "kernel", name, "version", k.Version, "format", k.Format)
	return k, nil
}

// rebaseKernel rewrites the artifact paths of k from dir from to dir to.
func rebaseKernel(k model.Kernel, from, to string) model.Kernel {
	k.Dir = to
	k.Kernel.Path = subpath.Rebase(k.Kernel.Path, from, to)
	if k.Initrd != nil {
		a := *k.Initrd
		a.Path = subpath.Rebase(a.Path, from, to)
		k.Initrd = &a
	}
	if k.Modules != nil {
		a := *k.Modules
		a.Path = subpath.Rebase(a.Path, from, to)
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

// RecoverKernelLeftovers removes partial imports left by a crash.
func (s *Service) RecoverKernelLeftovers(_ context.Context) error {
	for _, pat := range []string{".upload-*", ".new-*", "*.old-*"} {
		m, _ := filepath.Glob(filepath.Join(s.cfg.KernelsDir(), pat))
		for _, p := range m {
			if err := os.RemoveAll(p); err == nil {
				s.log.Info("removed leftover of an interrupted kernel import", "path", p)
			}
		}
	}
	if removed, err := kernels.RemoveStale(s.cfg.KernelsDir()); err == nil {
		for _, p := range removed {
			s.log.Info("removed leftover kernel staging dir", "path", p)
		}
	}
	return nil
}
