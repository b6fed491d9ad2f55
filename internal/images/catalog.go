package images

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/subpath"
	"github.com/bangerdev/banger/internal/units"
)

// catalogCacheDir holds bundle downloads: <sha256>.partial while
// downloading, <sha256>.bundle once verified, until the image is published.
func (s *Service) catalogCacheDir() string { return filepath.Join(s.cfg.CacheDir, "catalog") }

// Catalog lists the image catalog's entries, each marked with the local
// images pulled from it.
func (s *Service) Catalog(ctx context.Context) ([]api.CatalogListing, error) {
	if s.cfg.ImageCatalog == "" {
		return nil, api.Errorf(api.CodeInvalid, "the image catalog is not configured: set image_catalog in the config file")
	}
	ix, err := imagecat.Fetch(ctx, s.cfg.ImageCatalog)
	if err != nil {
		return nil, err
	}
	imgs, err := s.store.ListImages()
	if err != nil {
		return nil, err
	}
	out := make([]api.CatalogListing, 0, len(ix.Entries))
	for _, e := range ix.Entries {
		l := api.CatalogListing{Name: e.Name, Description: e.Description, KernelRef: e.KernelRef}
		l.OS.ID, l.OS.Version = e.OS.ID, e.OS.Version
		l.Bundle.URL, l.Bundle.SHA256, l.Bundle.Size = e.Bundle.URL, e.Bundle.SHA256, e.Bundle.Size
		for _, img := range imgs {
			if img.Source == imagecat.Source && img.Ref == e.Name {
				l.Pulled = true
				l.Images = append(l.Images, img.Name)
				l.Current = l.Current || img.Digest == "sha256:"+e.Bundle.SHA256
			}
		}
		out = append(out, l)
	}
	return out, nil
}

// pullCatalogImage is the catalog fast path of POST /v1/images/pull:
// catalogTarget (look the bare name up in the image catalog) → pullInputs →
// stage → Download the bundle into the cache (resumable) and verify its
// sha256 → unpackBundle into <images>/<id>.staging → InjectGuestAgents →
// bundleKernel → publishImage. Any failure or cancellation removes the
// staging dir; nothing is published.
func (s *Service) pullCatalogImage(ctx context.Context, req api.PullRequest, uid uint32, report progress.Func) (img model.Image, retErr error) {
	entry, imgName, err := s.catalogTarget(ctx, req, uid, report)
	if err != nil {
		return img, err
	}
	// The entry's own kernel ref is resolved only once the bundle shows it
	// carries no kernel.
	size, agent, kernel, err := s.pullInputs(ctx, req, report)
	if err != nil {
		return img, err
	}
	st, err := s.stage(s.log.With("image", imgName, "catalog_entry", entry.Name))
	if err != nil {
		return img, err
	}
	defer func() { st.end(retErr) }()

	start := time.Now()
	bundle, err := imagecat.Download(ctx, entry.Bundle, s.catalogCacheDir(), report)
	if err != nil {
		if errors.Is(err, imagecat.ErrChecksum) {
			return img, api.Errorf(api.CodeInvalid, "%v", err)
		}
		return img, err
	}
	st.log.Info("bundle downloaded and verified", "sha256", entry.Bundle.SHA256, "duration", time.Since(start).Round(time.Millisecond))
	un, size, err := s.unpackBundle(ctx, entry, bundle, st.dir, size, req.Size, report)
	if err != nil {
		return img, err
	}
	report.Report(progress.Event{Phase: "inject", Message: "this host's guest agent"})
	if err := imagepull.InjectGuestAgents(ctx, un.RootFS, imagepull.GuestAssets{AgentBinary: agent}); err != nil {
		return img, err
	}
	report.Report(progress.Event{Phase: "inject", Done: true})
	if kernel, err = s.bundleKernel(ctx, imgName, entry, un, kernel, req.Force, uid, report); err != nil {
		return img, err
	}

	img = model.Image{
		ID: st.id, Name: imgName, Ref: entry.Name, Source: imagecat.Source, Digest: "sha256:" + entry.Bundle.SHA256,
		Dir: st.final, RootFS: filepath.Join(st.final, imagecat.MemberRootFS), Size: size,
		Managed: true, Created: time.Now().UTC(), OwnerUID: uid,
	}
	if err := s.publishImage(ctx, &img, kernel, "the catalog entry names no kernel", st, un.RootFS, req.Force, report); err != nil {
		return img, err
	}
	// The image is the product: the verified bundle is not kept.
	if err := os.Remove(bundle); err != nil {
		st.log.Warn("remove downloaded bundle", "path", bundle, "err", err)
	}
	st.log.Info("image published from the catalog", "rootfs", img.RootFS, "size", size, "data", un.DataBytes,
		"duration", time.Since(start).Round(time.Millisecond))
	return img, nil
}

// catalogTarget looks a bare name up in the image catalog and checks the
// name the image gets.
func (s *Service) catalogTarget(ctx context.Context, req api.PullRequest, uid uint32, report progress.Func) (imagecat.Entry, string, error) {
	if err := model.ValidateName("image", req.Ref); err != nil {
		return imagecat.Entry{}, "", api.Errorf(api.CodeInvalid, "%v", err)
	}
	report.Report(progress.Event{Phase: "resolve", Item: req.Ref, Message: "image catalog"})
	ix, err := imagecat.Fetch(ctx, s.cfg.ImageCatalog)
	if err != nil {
		return imagecat.Entry{}, "", fmt.Errorf("image catalog: %w", err)
	}
	entry, ok := ix.Lookup(req.Ref)
	if !ok {
		names := "it is empty"
		if len(ix.Entries) > 0 {
			names = "it has: " + strings.Join(ix.Names(), ", ")
		}
		return entry, "", api.Errorf(api.CodeNotFound,
			"%q is not in the image catalog (%s); to pull from a registry use a full reference such as docker.io/library/%s:latest",
			req.Ref, names, req.Ref)
	}
	imgName := req.Name
	if imgName == "" {
		imgName = entry.Name
	}
	if err := model.ValidateName("image", imgName); err != nil {
		return entry, "", api.Errorf(api.CodeInvalid, "%v", err)
	}
	if old, err := s.store.GetImage(imgName); err == nil {
		if !req.Force {
			return entry, "", api.Errorf(api.CodeConflict,
				"image %q already exists and %q is also a catalog entry: pass --force to replace the local image with the catalog's, or --name to pull it under another name",
				imgName, entry.Name)
		}
		if err := mayReplace(uid, "image", imgName, old.OwnerUID); err != nil {
			return entry, "", err
		}
	}
	return entry, imgName, nil
}

// unpackBundle unpacks a verified bundle into dir, checks it against its
// entry and grows its ext4 to size when one was asked for (sizeFlag is the
// --size as given, for errors). It returns the unpacked bundle and the
// image size.
func (s *Service) unpackBundle(ctx context.Context, entry imagecat.Entry, bundle, dir string, size int64, sizeFlag string,
	report progress.Func) (imagecat.Unpacked, int64, error) {
	un, err := imagecat.UnpackFile(ctx, bundle, dir, report)
	if err == nil {
		err = imagecat.CheckMetadata(un.Metadata, entry)
	}
	if err != nil {
		if errors.Is(err, imagecat.ErrBadBundle) {
			// Verified, yet unusable: the catalog publishes a bad bundle.
			// Drop it so that a fixed catalog is downloaded afresh.
			_ = os.Remove(bundle)
			return un, 0, api.Errorf(api.CodeInvalid, "catalog entry %q: %v", entry.Name, err)
		}
		return un, 0, err
	}
	if size == 0 || size == un.Metadata.RootFSSize {
		return un, un.Metadata.RootFSSize, nil
	}
	report.Report(progress.Event{Phase: "resize", Message: fmt.Sprintf("%s to %s", units.HumanBytes(un.Metadata.RootFSSize), units.HumanBytes(size))})
	if err := imagecat.GrowExt4(ctx, un.RootFS, size); err != nil {
		if errors.Is(err, imagecat.ErrShrink) {
			return un, 0, api.Errorf(api.CodeInvalid, "--size %s: %v (%s)", sizeFlag, err, units.HumanBytes(un.Metadata.RootFSSize))
		}
		return un, 0, err
	}
	return un, size, nil
}

// bundleKernel picks the kernel a catalog image boots: the --kernel-ref
// given (kernel), else the one the bundle carries (adopted), else the
// entry's kernel ref. The bundle's own kernel files leave the image dir:
// adopted or unused, only the rootfs stays.
func (s *Service) bundleKernel(ctx context.Context, imgName string, entry imagecat.Entry, un imagecat.Unpacked, kernel *model.Kernel,
	force bool, uid uint32, report progress.Func) (*model.Kernel, error) {
	defer func() {
		for _, p := range []string{un.Kernel, un.Initrd} {
			if p != "" {
				_ = os.Remove(p)
			}
		}
	}()
	if kernel == nil && un.Kernel != "" {
		k, err := s.adoptBundleKernel(ctx, imgName, un, force, uid)
		if err != nil {
			return nil, err
		}
		kernel = &k
	}
	if kernel == nil && entry.KernelRef != "" {
		k, err := s.ResolveKernel(ctx, entry.KernelRef, report)
		if err != nil {
			return nil, fmt.Errorf("catalog entry %q boots kernel %q: %w", entry.Name, entry.KernelRef, err)
		}
		kernel = &k
	}
	return kernel, nil
}

// adoptBundleKernel records the kernel a bundle carries as kernel
// "<image>-kernel" (its modules are inside the rootfs already). An
// existing kernel of that name is reused when it has the same version,
// replaced with force, and a conflict otherwise.
func (s *Service) adoptBundleKernel(ctx context.Context, image string, un imagecat.Unpacked, force bool, uid uint32) (model.Kernel, error) {
	name := image + "-kernel"
	if err := model.ValidateName("kernel", name); err != nil {
		return model.Kernel{}, api.Errorf(api.CodeInvalid, "bundle kernel: %v", err)
	}
	if k, err := s.store.GetKernel(name); err == nil {
		if k.Version == un.Metadata.Kernel.Version {
			return k, nil
		}
		if !force {
			return model.Kernel{}, api.Errorf(api.CodeConflict,
				"the bundle carries kernel %s, but kernel %q (%s) exists: pass --force to replace it", un.Metadata.Kernel.Version, name, k.Version)
		}
		if err := mayReplace(uid, "kernel", name, k.OwnerUID); err != nil {
			return model.Kernel{}, err
		}
	}
	dir := filepath.Join(s.cfg.KernelsDir(), name+".new-"+model.NewID()[:8])
	k, err := kernels.AdoptFiles(ctx, dir, name, un.Kernel, un.Initrd, "")
	if err != nil {
		return model.Kernel{}, fmt.Errorf("bundle kernel: %w", err)
	}
	final := filepath.Join(s.cfg.KernelsDir(), name)
	if err := subpath.RemoveAll(s.cfg.KernelsDir(), final); err != nil {
		_ = os.RemoveAll(dir)
		return model.Kernel{}, fmt.Errorf("bundle kernel: replace %s: %w", final, err)
	}
	if err := os.Rename(dir, final); err != nil {
		_ = os.RemoveAll(dir)
		return model.Kernel{}, fmt.Errorf("bundle kernel: %w", err)
	}
	k = rebaseKernel(k, dir, final)
	k.Source, k.SourceRef, k.OwnerUID = kernels.SourceCatalog, "image bundle "+image, uid
	if err := s.store.PutKernel(k, true); err != nil {
		return model.Kernel{}, fmt.Errorf("record bundle kernel: %w", err)
	}
	return k, nil
}
