package kernels

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/model"
)

// StageBootArtifacts places k's triple beside an image, as
// <imageDir>/kernel, <imageDir>/initrd and <imageDir>/modules/<version>,
// hard-linking from the kernel store where possible (else reflink, else
// copy), and returns their paths. Artifacts of a previously staged kernel
// are replaced; ones k lacks are removed. The staged files are shared with
// the kernel store through hard links: never modify them in place.
func StageBootArtifacts(ctx context.Context, k model.Kernel, imageDir string) (model.BootArtifacts, error) {
	if err := ctx.Err(); err != nil {
		return model.BootArtifacts{}, err
	}
	if k.Modules != nil {
		if err := checkVersion(k.Version); err != nil {
			return model.BootArtifacts{}, fmt.Errorf("stage kernel %q: %w", k.Name, err)
		}
	}
	staging, err := os.MkdirTemp(imageDir, ".boot-staging-")
	if err != nil {
		return model.BootArtifacts{}, fmt.Errorf("stage kernel %q into %s: %w", k.Name, imageDir, err)
	}
	defer os.RemoveAll(staging)
	wrap := func(err error) error { return fmt.Errorf("stage kernel %q into %s: %w", k.Name, imageDir, err) }

	ba := model.BootArtifacts{Kernel: filepath.Join(imageDir, KernelFile), Version: k.Version}
	if err := linkOrCopy(k.Kernel.Path, filepath.Join(staging, KernelFile), 0o644); err != nil {
		return ba, wrap(err)
	}
	if k.Initrd != nil {
		if err := linkOrCopy(k.Initrd.Path, filepath.Join(staging, InitrdFile), 0o644); err != nil {
			return ba, wrap(err)
		}
		ba.Initrd = filepath.Join(imageDir, InitrdFile)
	}
	if k.Modules != nil {
		if err := os.Mkdir(filepath.Join(staging, ModulesDir), 0o755); err != nil {
			return ba, wrap(err)
		}
		if err := copyTree(k.Modules.Path, filepath.Join(staging, ModulesDir, k.Version), true); err != nil {
			return ba, wrap(err)
		}
		ba.Modules = filepath.Join(imageDir, ModulesDir, k.Version)
	}
	if err := syncDir(staging); err != nil {
		return ba, wrap(err)
	}
	// Swap each artifact in: the old one (if any) moves into staging and
	// goes away with it.
	for _, name := range []string{KernelFile, InitrdFile, ModulesDir} {
		dst := filepath.Join(imageDir, name)
		if err := os.Rename(dst, filepath.Join(staging, "old-"+name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return ba, wrap(err)
		}
		if err := os.Rename(filepath.Join(staging, name), dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return ba, wrap(err)
		}
	}
	return ba, nil
}
