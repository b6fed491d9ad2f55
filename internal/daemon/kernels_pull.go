package daemon

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
)

// handleKernelPull downloads a kernel catalog entry, verifies it and
// records it.
func (d *Daemon) handleKernelPull(w http.ResponseWriter, r *http.Request) {
	var req api.KernelPullRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	if err := model.ValidateName("kernel", req.Name); err != nil {
		d.writeError(w, r, api.Errorf(api.CodeInvalid, "%v", err))
		return
	}
	if !CallerFrom(r.Context()).Root() {
		d.writeError(w, r, api.Errorf(api.CodeForbidden, "pulling kernels needs root: kernels are shared by every user of this host"))
		return
	}
	if d.cfg.KernelCatalog == "" {
		d.writeError(w, r, api.Errorf(api.CodeInvalid, "no kernel catalog is configured: set kernel_catalog in the config file, or import a kernel with banger kernel import"))
		return
	}
	if _, err := d.store.GetKernel(req.Name); err == nil && !req.Force {
		d.writeError(w, r, api.Errorf(api.CodeConflict, "kernel %q already exists: pass --force to pull it again", req.Name))
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		dst := filepath.Join(d.cfg.KernelsDir(), req.Name)
		old := ""
		if _, err := os.Stat(dst); err == nil {
			old = dst + ".old-" + newID()[:8]
			if err := os.Rename(dst, old); err != nil {
				return nil, err
			}
		}
		restore := func() {
			if old != "" {
				_ = os.Rename(old, dst)
			}
		}
		k, err := d.kernelCatalog(report).PullKernel(ctx, req.Name)
		if err != nil {
			restore()
			if errors.Is(err, kernels.ErrNotInCatalog) {
				names, _ := d.kernelCatalog(nil).CatalogNames(ctx)
				return nil, api.Errorf(api.CodeNotFound, "kernel %q is not in the catalog %s (it has: %v)", req.Name, d.cfg.KernelCatalog, names)
			}
			return nil, err
		}
		k.Created = time.Now().UTC()
		if err := d.store.PutKernel(k, true); err != nil {
			_ = os.RemoveAll(dst)
			restore()
			return nil, err
		}
		if old != "" {
			_ = os.RemoveAll(old)
		}
		d.log.Info("kernel pulled from the catalog", "kernel", k.Name, "version", k.Version)
		return k, nil
	})
}
