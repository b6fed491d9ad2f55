package kernels

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/bangerdev/banger/internal/model"
)

// ErrKernelNotFound is returned by ResolveKernelInputs when a reference
// names neither a local kernel nor a catalog entry.
var ErrKernelNotFound = errors.New("kernel not found")

// ErrNotInCatalog is returned by a Catalog that has no entry of a name.
var ErrNotInCatalog = errors.New("no such catalog entry")

// LocalKernels is the daemon's kernel store as ResolveKernelInputs sees it.
type LocalKernels interface {
	// LookupKernel returns the local kernel of this name.
	LookupKernel(name string) (model.Kernel, bool)
	// KernelNames lists the local kernels.
	KernelNames() []string
}

// Catalog is a kernel catalog ResolveKernelInputs can pull from
// (kernelcat.Catalog implements it).
type Catalog interface {
	// CatalogNames lists the catalog's entries.
	CatalogNames(ctx context.Context) ([]string, error)
	// PullKernel downloads, verifies and publishes the entry of this name,
	// or returns an error wrapping ErrNotInCatalog.
	PullKernel(ctx context.Context, name string) (model.Kernel, error)
}

// ResolveKernelInputs finds the kernel ref names: a local kernel first,
// then the catalog (pulling the entry; the caller records the returned
// kernel in its store), else an error wrapping ErrKernelNotFound that lists
// the local kernels and the catalog's entries. catalog may be nil.
func ResolveKernelInputs(ctx context.Context, ref string, local LocalKernels, catalog Catalog) (model.Kernel, error) {
	if err := model.ValidateName("kernel", ref); err != nil {
		return model.Kernel{}, fmt.Errorf("resolve kernel: %w", err)
	}
	if local != nil {
		if k, ok := local.LookupKernel(ref); ok {
			return k, nil
		}
	}
	localNames := "none"
	if local != nil {
		if names := local.KernelNames(); len(names) > 0 {
			sort.Strings(names)
			localNames = strings.Join(names, ", ")
		}
	}
	if catalog == nil {
		return model.Kernel{}, fmt.Errorf("kernel %q: not found locally (local kernels: %s) and no kernel catalog is configured; import one with `banger kernel import`: %w",
			ref, localNames, ErrKernelNotFound)
	}
	k, err := catalog.PullKernel(ctx, ref)
	if err == nil {
		return k, nil
	}
	if !errors.Is(err, ErrNotInCatalog) {
		return model.Kernel{}, fmt.Errorf("kernel %q: not found locally, pull from catalog: %w", ref, err)
	}
	catNames := "none"
	names, lerr := catalog.CatalogNames(ctx)
	switch {
	case lerr != nil:
		catNames = "unavailable: " + lerr.Error()
	case len(names) > 0:
		sort.Strings(names)
		catNames = strings.Join(names, ", ")
	}
	return model.Kernel{}, fmt.Errorf("kernel %q: not found (local kernels: %s; catalog: %s): %w", ref, localNames, catNames, ErrKernelNotFound)
}
