package images

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
)

// CheckKernelPull refuses a kernel pull that cannot start: a bad name, no
// kernel catalog, or a kernel of that name without force.
func (s *Service) CheckKernelPull(req api.KernelPullRequest) error {
	if err := model.ValidateName("kernel", req.Name); err != nil {
		return api.Errorf(api.CodeInvalid, "%v", err)
	}
	if s.cfg.KernelCatalog == "" {
		return api.Errorf(api.CodeInvalid, "no kernel catalog is configured: set kernel_catalog in the config file, or import a kernel with banger kernel import")
	}
	if _, err := s.store.GetKernel(req.Name); err == nil && !req.Force {
		return api.Errorf(api.CodeConflict, "kernel %q already exists: pass --force to pull it again", req.Name)
	}
	return nil
}

// PullKernel downloads a kernel catalog entry, verifies it and records it,
// replacing a kernel of the same name (CheckKernelPull ran first).
func (s *Service) PullKernel(ctx context.Context, req api.KernelPullRequest, report progress.Func) (model.Kernel, error) {
	dst := filepath.Join(s.cfg.KernelsDir(), req.Name)
	old := ""
	if _, err := os.Stat(dst); err == nil {
		old = dst + ".old-" + model.NewID()[:8]
		if err := os.Rename(dst, old); err != nil {
			return model.Kernel{}, err
		}
	}
	restore := func() {
		if old != "" {
			_ = os.Rename(old, dst)
		}
	}
	k, err := s.kernelCatalog(report).PullKernel(ctx, req.Name)
	if err != nil {
		restore()
		if errors.Is(err, kernels.ErrNotInCatalog) {
			names, _ := s.kernelCatalog(nil).CatalogNames(ctx)
			return k, api.Errorf(api.CodeNotFound, "kernel %q is not in the catalog %s (it has: %v)", req.Name, s.cfg.KernelCatalog, names)
		}
		return k, err
	}
	k.Created = time.Now().UTC()
	if err := s.store.PutKernel(k, true); err != nil {
		_ = os.RemoveAll(dst)
		restore()
		return k, err
	}
	if old != "" {
		_ = os.RemoveAll(old)
	}
	s.log.Info("kernel pulled from the catalog", "kernel", k.Name, "version", k.Version)
	return k, nil
}
