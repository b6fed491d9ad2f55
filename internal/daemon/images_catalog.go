package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
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
	"github.com/bangerdev/banger/internal/units"
)

// CatalogListing is one entry of GET /v1/images/catalog: the index entry
// and whether it is pulled.
type CatalogListing struct {
	imagecat.Entry
	// Pulled is true when a local image came from this entry.
	Pulled bool `json:"pulled"`
	// Images are the local images pulled from this entry.
	Images []string `json:"images,omitempty"`
	// Current is true when one of them is the entry's current bundle.
	Current bool `json:"current,omitempty"`
}

// catalogCacheDir holds bundle downloads: <sha256>.partial while
// downloading, <sha256>.bundle once verified, until the image is published.
func (d *Daemon) catalogCacheDir() string { return filepath.Join(d.cfg.CacheDir, "catalog") }

func (d *Daemon) handleImageCatalog(w http.ResponseWriter, r *http.Request) {
	if d.cfg.ImageCatalog == "" {
		d.writeError(w, r, api.Errorf(api.CodeInvalid, "the image catalog is not configured: set image_catalog in the config file"))
		return
	}
	ix, err := imagecat.Fetch(r.Context(), d.cfg.ImageCatalog)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	imgs, err := d.store.ListImages()
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	out := make([]CatalogListing, 0, len(ix.Entries))
	for _, e := range ix.Entries {
		l := CatalogListing{Entry: e}
		for _, img := range imgs {
			if img.Source == imagecat.Source && img.Ref == e.Name {
				l.Pulled = true
				l.Images = append(l.Images, img.Name)
				l.Current = l.Current || img.Digest == "sha256:"+e.Bundle.SHA256
			}
		}
		out = append(out, l)
	}
	writeJSON(w, http.StatusOK, out)
}

// pullCatalogImage is the catalog fast path of POST /v1/images/pull: look
// the bare name up in the image catalog, download the bundle into the
// cache (resumable), verify its sha256, and only then unpack it into
// <images>/<id>.staging, inject this daemon's guest agent, stage the
// kernel, rename into place and record the image. Any failure or
// cancellation removes the staging dir; nothing is published.
func (d *Daemon) pullCatalogImage(ctx context.Context, req api.PullRequest, _ Caller, report progress.Func) (img model.Image, retErr error) {
	if err := model.ValidateName("image", req.Ref); err != nil {
		return img, api.Errorf(api.CodeInvalid, "%v", err)
	}
	report.Report(progress.Event{Phase: "resolve", Item: req.Ref, Message: "image catalog"})
	ix, err := imagecat.Fetch(ctx, d.cfg.ImageCatalog)
	if err != nil {
		return img, fmt.Errorf("image catalog: %w", err)
	}
	entry, ok := ix.Lookup(req.Ref)
	if !ok {
		names := "it is empty"
		if len(ix.Entries) > 0 {
			names = "it has: " + strings.Join(ix.Names(), ", ")
		}
		return img, api.Errorf(api.CodeNotFound,
			"%q is not in the image catalog (%s); to pull from a registry use a full reference such as docker.io/library/%s:latest",
			req.Ref, names, req.Ref)
	}
	name := req.Name
	if name == "" {
		name = entry.Name
	}
	if err := model.ValidateName("image", name); err != nil {
		return img, api.Errorf(api.CodeInvalid, "%v", err)
	}
	if _, err := d.store.GetImage(name); err == nil && !req.Force {
		return img, api.Errorf(api.CodeConflict,
			"image %q already exists and %q is also a catalog entry: pass --force to replace the local image with the catalog's, or --name to pull it under another name",
			name, entry.Name)
	}
	// The entry's own kernel ref is resolved only once the bundle shows it
	// carries no kernel.
	size, agent, kernel, err := d.pullInputs(ctx, req, report)
	if err != nil {
		return img, err
	}

	id := newID()
	log := d.log.With("image", name, "id", id, "catalog_entry", entry.Name)
	staging := filepath.Join(d.cfg.ImagesDir(), id+".staging")
	final := filepath.Join(d.cfg.ImagesDir(), id)
	if err := os.Mkdir(staging, 0o700); err != nil {
		return img, fmt.Errorf("create staging dir: %w", err)
	}
	published := false
	defer func() {
		if !published {
			if err := os.RemoveAll(staging); err != nil {
				log.Error("remove staging dir", "dir", staging, "err", err)
			}
		}
		if retErr != nil {
			log.Info("catalog pull failed; nothing was published", "err", retErr)
		}
	}()

	start := time.Now()
	bundle, err := imagecat.Download(ctx, entry.Bundle, d.catalogCacheDir(), report)
	if err != nil {
		if errors.Is(err, imagecat.ErrChecksum) {
			return img, api.Errorf(api.CodeInvalid, "%v", err)
		}
		return img, err
	}
	log.Info("bundle downloaded and verified", "sha256", entry.Bundle.SHA256, "duration", time.Since(start).Round(time.Millisecond))
	un, err := imagecat.UnpackFile(ctx, bundle, staging, report)
	if err == nil {
		err = imagecat.CheckMetadata(un.Metadata, entry)
	}
	if err != nil {
		if errors.Is(err, imagecat.ErrBadBundle) {
			// Verified, yet unusable: the catalog publishes a bad bundle.
			// Drop it so that a fixed catalog is downloaded afresh.
			_ = os.Remove(bundle)
			return img, api.Errorf(api.CodeInvalid, "catalog entry %q: %v", entry.Name, err)
		}
		return img, err
	}
	ext4 := un.RootFS
	if size != 0 && size != un.Metadata.RootFSSize {
		report.Report(progress.Event{Phase: "resize", Message: fmt.Sprintf("%s to %s", units.HumanBytes(un.Metadata.RootFSSize), units.HumanBytes(size))})
		if err := imagecat.GrowExt4(ctx, ext4, size); err != nil {
			if errors.Is(err, imagecat.ErrShrink) {
				return img, api.Errorf(api.CodeInvalid, "--size %s: %v (%s)", req.Size, err, units.HumanBytes(un.Metadata.RootFSSize))
			}
			return img, err
		}
	} else {
		size = un.Metadata.RootFSSize
	}
	report.Report(progress.Event{Phase: "inject", Message: "this host's guest agent"})
	if err := imagepull.InjectGuestAgents(ctx, ext4, imagepull.GuestAssets{AgentBinary: agent}); err != nil {
		return img, err
	}
	report.Report(progress.Event{Phase: "inject", Done: true})

	if kernel == nil && un.Kernel != "" {
		k, err := d.adoptBundleKernel(ctx, name, un, req.Force)
		if err != nil {
			return img, err
		}
		kernel = &k
	}
	if kernel == nil && entry.KernelRef != "" {
		k, err := d.resolveKernel(ctx, entry.KernelRef, report)
		if err != nil {
			return img, fmt.Errorf("catalog entry %q boots kernel %q: %w", entry.Name, entry.KernelRef, err)
		}
		kernel = &k
	}
	// The bundle's own kernel files were adopted (or are unused): only the
	// rootfs stays in the image dir.
	for _, p := range []string{un.Kernel, un.Initrd} {
		if p != "" {
			_ = os.Remove(p)
		}
	}

	img = model.Image{
		ID: id, Name: name, Ref: entry.Name, Source: imagecat.Source, Digest: "sha256:" + entry.Bundle.SHA256,
		Dir: final, RootFS: filepath.Join(final, imagecat.MemberRootFS), Size: size,
		Managed: true, Created: time.Now().UTC(),
	}
	published, err = d.publishImage(ctx, &img, kernel, "the catalog entry names no kernel", staging, ext4, req.Force, report, log)
	if err != nil {
		return img, err
	}
	// The image is the product: the verified bundle is not kept.
	if err := os.Remove(bundle); err != nil {
		log.Warn("remove downloaded bundle", "path", bundle, "err", err)
	}
	log.Info("image published from the catalog", "rootfs", img.RootFS, "size", size, "data", un.DataBytes,
		"duration", time.Since(start).Round(time.Millisecond))
	return img, nil
}

// adoptBundleKernel records the kernel a bundle carries as kernel
// "<image>-kernel" (its modules are inside the rootfs already). An
// existing kernel of that name is reused when it has the same version,
// replaced with force, and a conflict otherwise.
func (d *Daemon) adoptBundleKernel(ctx context.Context, image string, un imagecat.Unpacked, force bool) (model.Kernel, error) {
	name := image + "-kernel"
	if err := model.ValidateName("kernel", name); err != nil {
		return model.Kernel{}, api.Errorf(api.CodeInvalid, "bundle kernel: %v", err)
	}
	if k, err := d.store.GetKernel(name); err == nil {
		if k.Version == un.Metadata.Kernel.Version {
			return k, nil
		}
		if !force {
			return model.Kernel{}, api.Errorf(api.CodeConflict,
				"the bundle carries kernel %s, but kernel %q (%s) exists: pass --force to replace it", un.Metadata.Kernel.Version, name, k.Version)
		}
	}
	dir := filepath.Join(d.cfg.KernelsDir(), name+".new-"+newID()[:8])
	k, err := kernels.AdoptFiles(ctx, dir, name, un.Kernel, un.Initrd, "")
	if err != nil {
		return model.Kernel{}, fmt.Errorf("bundle kernel: %w", err)
	}
	final := filepath.Join(d.cfg.KernelsDir(), name)
	if err := d.removeUnder(d.cfg.KernelsDir(), final); err != nil {
		_ = os.RemoveAll(dir)
		return model.Kernel{}, fmt.Errorf("bundle kernel: replace %s: %w", final, err)
	}
	if err := os.Rename(dir, final); err != nil {
		_ = os.RemoveAll(dir)
		return model.Kernel{}, fmt.Errorf("bundle kernel: %w", err)
	}
	k = rebaseKernel(k, dir, final)
	k.Source, k.SourceRef = kernels.SourceCatalog, "image bundle "+image
	if err := d.store.PutKernel(k, true); err != nil {
		return model.Kernel{}, fmt.Errorf("record bundle kernel: %w", err)
	}
	return k, nil
}
