package images

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/kernels/kernelcat"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
)

// localKernels adapts the store to kernels.LocalKernels.
type localKernels struct{ s *Service }

func (l localKernels) LookupKernel(name string) (model.Kernel, bool) {
	k, err := l.s.store.GetKernel(name)
	return k, err == nil
}

func (l localKernels) KernelNames() []string {
	ks, _ := l.s.store.ListKernels()
	names := make([]string, 0, len(ks))
	for _, k := range ks {
		names = append(names, k.Name)
	}
	return names
}

// kernelCatalog is the configured kernel catalog.
func (s *Service) kernelCatalog(report progress.Func) kernels.Catalog {
	return &kernelcat.Catalog{
		IndexURL:   s.cfg.KernelCatalog,
		KernelsDir: s.cfg.KernelsDir(),
		CacheDir:   filepath.Join(s.cfg.CacheDir, "kernels"),
		Progress:   report,
	}
}

// ResolveKernel finds a kernel by name: local first, then the kernel
// catalog (auto-pulled and recorded), else an error listing what exists.
func (s *Service) ResolveKernel(ctx context.Context, ref string, report progress.Func) (model.Kernel, error) {
	var cat kernels.Catalog
	if s.cfg.KernelCatalog != "" {
		cat = s.kernelCatalog(report)
	}
	k, err := kernels.ResolveKernelInputs(ctx, ref, localKernels{s}, cat)
	if err != nil {
		return k, api.Errorf(api.CodeNotFound, "%v", err)
	}
	if _, err := s.store.GetKernel(k.Name); err != nil {
		if err := s.store.PutKernel(k, false); err != nil {
			return k, fmt.Errorf("record pulled kernel: %w", err)
		}
	}
	return k, nil
}

// stageBootArtifacts puts the kernel triple beside an image being
// published: the kernel and initrd are hardlinked (copied across file
// systems) into stagingDir, and the paths recorded are those under finalDir.
func (s *Service) stageBootArtifacts(ctx context.Context, k model.Kernel, stagingDir, ext4, finalDir string) (model.BootArtifacts, error) {
	boot, err := kernels.StageBootArtifacts(ctx, k, stagingDir)
	if err != nil {
		return boot, fmt.Errorf("stage kernel %s: %w", k.Name, err)
	}
	if k.Modules != nil {
		if err := kernels.InstallModules(ctx, ext4, k.Modules.Path, k.Version); err != nil {
			return boot, fmt.Errorf("install kernel modules into the image: %w", err)
		}
	}
	rebase := func(p string) string {
		if p == "" {
			return ""
		}
		rel, err := filepath.Rel(stagingDir, p)
		if err != nil {
			return p
		}
		return filepath.Join(finalDir, rel)
	}
	boot.Kernel, boot.Initrd, boot.Modules = rebase(boot.Kernel), rebase(boot.Initrd), rebase(boot.Modules)
	return boot, nil
}
