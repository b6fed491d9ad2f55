package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/privdir"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/units"
)

// PullRequest is the body of POST /v1/images/pull.
type PullRequest = api.PullRequest

// pulls tracks the layer digests of pulls in progress, so that a cache prune
// running meanwhile keeps them.
type pulls struct {
	mu     sync.Mutex
	layers map[string]int
}

func (p *pulls) add(digests []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.layers == nil {
		p.layers = map[string]int{}
	}
	for _, d := range digests {
		p.layers[d]++
	}
}

func (p *pulls) remove(digests []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, d := range digests {
		if p.layers[d]--; p.layers[d] <= 0 {
			delete(p.layers, d)
		}
	}
}

func (d *Daemon) handleImagePull(w http.ResponseWriter, r *http.Request) {
	var req api.PullRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	caller := CallerFrom(r.Context())
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		if imagepull.IsCatalogName(req.Ref) {
			return d.pullFromCatalog(ctx, req, caller, report)
		}
		return d.pullFromOCI(ctx, req, caller, report)
	})
}

// pullFromCatalog is the catalog fast path. Until an image catalog is
// configured it explains how to pull from a registry instead.
func (d *Daemon) pullFromCatalog(ctx context.Context, req api.PullRequest, caller Caller, report progress.Func) (model.Image, error) {
	if d.cfg.ImageCatalog != "" {
		return d.pullCatalogImage(ctx, req, caller, report)
	}
	return model.Image{}, api.Errorf(api.CodeInvalid,
		"%q is a catalog name, but the image catalog is not configured (set image_catalog in the config file); to pull from a registry use a full reference such as docker.io/library/%s:latest",
		req.Ref, req.Ref)
}

// newID returns a random 24-hex-digit id.
func newID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// pullFromOCI pulls an image from an OCI registry and publishes it: stage at
// <images>/<id>.staging, extract under <state>/tmp/pull-<rand>, build and
// fix the ext4, inject the guest agents, stage the kernel, rename into
// place, then record it. Any failure or cancellation removes everything it
// made.
func (d *Daemon) pullFromOCI(ctx context.Context, req api.PullRequest, caller Caller, report progress.Func) (img model.Image, retErr error) {
	ref, err := imagepull.ParseReference(req.Ref)
	if err != nil {
		return img, api.Errorf(api.CodeInvalid, "%v", err)
	}
	name := req.Name
	if name == "" {
		name = imagepull.DefaultImageName(ref)
	}
	if err := model.ValidateName("image", name); err != nil {
		return img, api.Errorf(api.CodeInvalid, "%v", err)
	}
	if _, err := d.store.GetImage(name); err == nil && !req.Force {
		return img, api.Errorf(api.CodeConflict, "image %q already exists: pass --force to replace it, or --name to pull under another name", name)
	}
	size, agent, kernel, err := d.pullInputs(ctx, req, report)
	if err != nil {
		return img, err
	}

	id := newID()
	log := d.log.With("image", name, "id", id, "ref", ref.String())
	staging := filepath.Join(d.cfg.ImagesDir(), id+".staging")
	final := filepath.Join(d.cfg.ImagesDir(), id)
	if err := os.Mkdir(staging, 0o700); err != nil {
		return img, fmt.Errorf("create staging dir: %w", err)
	}
	scratch, err := privdir.MkdirTemp(d.cfg.ScratchDir(), "pull-")
	if err != nil {
		_ = os.RemoveAll(staging)
		return img, fmt.Errorf("create scratch dir: %w", err)
	}
	published := false
	defer func() {
		if err := os.RemoveAll(scratch); err != nil {
			log.Error("remove scratch dir", "dir", scratch, "err", err)
		}
		if !published {
			if err := os.RemoveAll(staging); err != nil {
				log.Error("remove staging dir", "dir", staging, "err", err)
			}
		}
		if retErr != nil {
			log.Info("image pull failed; nothing was published", "err", retErr)
		}
	}()
	rootDir := filepath.Join(scratch, "rootfs")
	if err := os.Mkdir(rootDir, 0o700); err != nil {
		return img, fmt.Errorf("create extraction dir: %w", err)
	}

	start := time.Now()
	pulled, err := imagepull.Pull(ctx, ref.String(), imagepull.PullOptions{
		Cache:    d.layerCache(),
		Keychain: d.keychainFor(caller),
		Progress: report,
	})
	if err != nil {
		return img, classifyPullError(err)
	}
	d.pulls.add(pulled.LayerDigests())
	defer d.pulls.remove(pulled.LayerDigests())
	log.Info("resolved image", "digest", pulled.Digest, "layers", len(pulled.Layers()))

	md, err := imagepull.Flatten(ctx, pulled, rootDir, imagepull.FlattenOptions{MaxBytes: size, Progress: report})
	if err != nil {
		return img, classifyPullError(err)
	}
	facts := imagepull.InspectGuest(rootDir)
	for _, n := range facts.Notes() {
		report.Report(progress.Event{Phase: "init", Message: n})
	}
	content := imagepull.DiskUsage(md)
	if size == 0 {
		size = imagepull.DefaultSize(content)
	} else if err := imagepull.CheckSize(content, size); err != nil {
		return img, api.Errorf(api.CodeInvalid, "%v", err)
	}
	ext4 := filepath.Join(staging, "rootfs.ext4")
	report.Report(progress.Event{Phase: "mkfs", Message: fmt.Sprintf("%s of content into a %s ext4", units.HumanBytes(content), units.HumanBytes(size))})
	if err := imagepull.BuildExt4(ctx, rootDir, ext4, size); err != nil {
		return img, err
	}
	report.Report(progress.Event{Phase: "mkfs", Done: true})
	// The extracted tree is no longer needed: free the disk space now.
	if err := os.RemoveAll(rootDir); err != nil {
		log.Warn("remove extracted tree", "err", err)
	}
	report.Report(progress.Event{Phase: "ownership", Current: int64(len(md)), Total: int64(len(md)), Unit: "files"})
	if err := imagepull.ApplyOwnership(ctx, ext4, md); err != nil {
		return img, err
	}
	report.Report(progress.Event{Phase: "ownership", Done: true})
	report.Report(progress.Event{Phase: "inject", Message: "guest agent, network and first-boot units"})
	runCfg := pulled.Config
	if err := imagepull.InjectGuestAgents(ctx, ext4, imagepull.GuestAssets{AgentBinary: agent, Config: &runCfg, SSHDReady: facts.SSHDReady}); err != nil {
		return img, err
	}
	report.Report(progress.Event{Phase: "inject", Done: true})

	img = model.Image{
		ID: id, Name: name, Ref: ref.String(), Source: "oci", Digest: pulled.Digest,
		Dir: final, RootFS: filepath.Join(final, "rootfs.ext4"), Size: size,
		Layers: pulled.LayerDigests(), Managed: true, Created: time.Now().UTC(),
		Config: &runCfg, Init: facts.Init, InitReason: facts.Reason, Notes: facts.Notes(),
	}
	published, err = d.publishImage(ctx, &img, kernel, "no --kernel-ref was given", staging, ext4, req.Force, report, log)
	if err != nil {
		return img, err
	}
	log.Info("image published", "rootfs", img.RootFS, "size", size, "duration", time.Since(start).Round(time.Millisecond))
	return img, nil
}

// publishImage finishes a pull whose ext4 is built in staging: it stages
// the kernel beside it (or notes why there is none), renames staging to
// img.Dir, records img (replacing an image of the same name when force) and
// removes a replaced image's files. published reports whether the rename
// happened, after which the caller's cleanup must leave staging alone.
func (d *Daemon) publishImage(ctx context.Context, img *model.Image, kernel *model.Kernel, whyNoKernel, staging, ext4 string,
	force bool, report progress.Func, log *slog.Logger) (published bool, err error) {
	if kernel != nil {
		boot, err := d.stageBootArtifacts(ctx, *kernel, staging, ext4, img.Dir)
		if err != nil {
			return false, err
		}
		img.Kernel, img.Boot = kernel.Name, &boot
	} else {
		img.Notes = append(img.Notes, "published without boot artifacts: "+whyNoKernel+"; pass --kernel-ref to vm create")
	}
	report.Report(progress.Event{Phase: "publish", Item: img.Name})
	if err := ctx.Err(); err != nil {
		return false, err
	}
	if err := os.Rename(staging, img.Dir); err != nil {
		return false, fmt.Errorf("publish image: %w", err)
	}
	old, err := d.store.PutImage(*img, force)
	if err != nil {
		_ = os.RemoveAll(img.Dir)
		if errors.Is(err, store.ErrConflict) {
			return true, api.Errorf(api.CodeConflict, "image %q was created by another pull meanwhile: pass --force to replace it", img.Name)
		}
		return true, err
	}
	if old != nil {
		if err := d.removeUnder(d.cfg.ImagesDir(), old.Dir); err != nil {
			log.Error("remove replaced image", "dir", old.Dir, "err", err)
		}
	}
	report.Report(progress.Event{Phase: "publish", Item: img.Name, Done: true})
	return true, nil
}

// pullInputs checks what every pull needs before it makes anything: the
// --size, e2fsprogs, the guest agent to inject, and the kernel the user
// named (resolved first, so that a typo fails before any download).
func (d *Daemon) pullInputs(ctx context.Context, req api.PullRequest, report progress.Func) (size int64, agent string, kernel *model.Kernel, err error) {
	if size, err = units.ParseSize(req.Size); err != nil {
		return 0, "", nil, api.Errorf(api.CodeInvalid, "%v", err)
	}
	if _, err := imagepull.CheckE2fsprogs(ctx); err != nil {
		return 0, "", nil, err
	}
	if agent, err = d.agentBinary(); err != nil {
		return 0, "", nil, err
	}
	if req.KernelRef != "" {
		k, err := d.resolveKernel(ctx, req.KernelRef, report)
		if err != nil {
			return 0, "", nil, err
		}
		kernel = &k
	}
	return size, agent, kernel, nil
}

// classifyPullError marks errors caused by the reference or the image
// content as invalid input; registry and I/O failures stay internal.
func classifyPullError(err error) error {
	var ee *imagepull.EntryError
	switch {
	case errors.Is(err, imagepull.ErrInvalidReference), errors.Is(err, imagepull.ErrPlatformNotFound),
		errors.Is(err, imagepull.ErrNotAnImage), errors.As(err, &ee):
		return api.Errorf(api.CodeInvalid, "%v", err)
	}
	return err
}

// layerCache is the shared OCI blob cache.
func (d *Daemon) layerCache() *imagepull.Cache {
	d.cacheOnce.Do(func() { d.cache = &imagepull.Cache{Dir: d.cfg.CacheDir} })
	return d.cache
}

// keychainFor reads registry credentials of the calling user (their
// ~/.docker/config.json and credential helpers), never root's on behalf of
// another user.
func (d *Daemon) keychainFor(c Caller) imagepullKeychain {
	home := ""
	if u, err := user.LookupId(strconv.FormatUint(uint64(c.UID), 10)); err == nil {
		home = u.HomeDir
	}
	return imagepull.UserKeychain(home)
}

// agentBinary finds the static guest agent to inject: the configured path,
// else beside the banger executable, else the install locations.
func (d *Daemon) agentBinary() (string, error) {
	return findHelper(d.cfg.AgentBinary, "banger-vsock-agent", "agent_binary")
}

func findHelper(configured, name, key string) (string, error) {
	if configured != "" {
		if _, err := os.Stat(configured); err != nil {
			return "", fmt.Errorf("%s %s: %w", key, configured, err)
		}
		return configured, nil
	}
	var candidates []string
	if exe, err := os.Executable(); err == nil {
		candidates = append(candidates, filepath.Join(filepath.Dir(exe), name))
	}
	candidates = append(candidates, "/usr/local/lib/banger/"+name, "/usr/lib/banger/"+name)
	for _, c := range candidates {
		if fi, err := os.Stat(c); err == nil && fi.Mode().IsRegular() {
			return c, nil
		}
	}
	return "", fmt.Errorf("the %s binary is not installed (looked in %s): run 'make install', or set %s in the config file", name, strings.Join(candidates, ", "), key)
}

// recoverPullLeftovers removes what a pull that died with the daemon left:
// <images>/*.staging dirs and everything in the scratch dir <state>/tmp.
// That dir is private to the daemon (root-owned, no other user may write
// it; privdir.Check refuses it otherwise), so nothing in it can have been
// planted, and nothing in it is read: entries are removed without
// following symlinks.
func recoverPullLeftovers(_ context.Context, d *Daemon) error {
	stagings, _ := filepath.Glob(filepath.Join(d.cfg.ImagesDir(), "*.staging"))
	for _, s := range stagings {
		if err := os.RemoveAll(s); err != nil {
			d.log.Error("remove leftover staging dir", "dir", s, "err", err)
			continue
		}
		d.log.Info("removed leftover staging dir of an interrupted pull", "dir", s)
	}
	scratch := d.cfg.ScratchDir()
	if err := privdir.Ensure(scratch); err != nil {
		return err
	}
	ents, err := os.ReadDir(scratch)
	if err != nil {
		return fmt.Errorf("read scratch dir: %w", err)
	}
	for _, e := range ents {
		s := filepath.Join(scratch, e.Name())
		if err := os.RemoveAll(s); err != nil {
			d.log.Error("remove leftover scratch dir", "dir", s, "err", err)
			continue
		}
		d.log.Info("removed leftover scratch dir of an interrupted pull", "dir", s)
	}
	return nil
}

func (d *Daemon) handleCachePrune(w http.ResponseWriter, r *http.Request) {
	if !CallerFrom(r.Context()).Root() {
		d.writeError(w, r, api.Errorf(api.CodeForbidden, "pruning the layer cache needs root"))
		return
	}
	imgs, err := d.store.ListImages()
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	keep := map[string]bool{}
	for _, img := range imgs {
		for _, l := range img.Layers {
			keep[l] = true
		}
	}
	d.pulls.mu.Lock()
	for l := range d.pulls.layers {
		keep[l] = true
	}
	d.pulls.mu.Unlock()
	n, freed, err := d.layerCache().Prune(r.Context(), keep)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	d.log.Info("layer cache pruned", "blobs", n, "freed", freed)
	writeJSON(w, http.StatusOK, api.PruneResult{Removed: n, Freed: freed})
}
