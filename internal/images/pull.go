package images

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/privdir"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/units"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

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

// Pull pulls an image for the caller with uid and publishes it: a bare
// catalog name from the image catalog, anything else from an OCI registry.
func (s *Service) Pull(ctx context.Context, req api.PullRequest, uid uint32, report progress.Func) (model.Image, error) {
	if imagepull.IsCatalogName(req.Ref) {
		return s.pullFromCatalog(ctx, req, uid, report)
	}
	return s.pullFromOCI(ctx, req, uid, report)
}

// pullFromCatalog is the catalog fast path. Until an image catalog is
// configured it explains how to pull from a registry instead.
func (s *Service) pullFromCatalog(ctx context.Context, req api.PullRequest, uid uint32, report progress.Func) (model.Image, error) {
	if s.cfg.ImageCatalog != "" {
		return s.pullCatalogImage(ctx, req, uid, report)
	}
	return model.Image{}, api.Errorf(api.CodeInvalid,
		"%q is a catalog name, but the image catalog is not configured (set image_catalog in the config file); to pull from a registry use a full reference such as docker.io/library/%s:latest",
		req.Ref, req.Ref)
}

// pullFromOCI pulls an image from an OCI registry and publishes it:
// ociTarget → pullInputs → stage → Pull → buildRootFS → publishImage. It
// extracts under <state>/tmp/pull-<rand> and builds in
// <images>/<id>.staging; any failure or cancellation removes everything it
// made.
func (s *Service) pullFromOCI(ctx context.Context, req api.PullRequest, uid uint32, report progress.Func) (img model.Image, retErr error) {
	ref, imgName, err := s.ociTarget(req, uid)
	if err != nil {
		return img, err
	}
	size, agent, kernel, err := s.pullInputs(ctx, req, report)
	if err != nil {
		return img, err
	}
	builder, err := imagepull.ParseBuilder(req.Builder)
	if err != nil {
		return img, api.Errorf(api.CodeInvalid, "%v", err)
	}
	st, err := s.stage(s.log.With("image", imgName, "ref", ref.String()))
	if err != nil {
		return img, err
	}
	defer func() { st.end(retErr) }()
	scratch, err := privdir.MkdirTemp(s.cfg.ScratchDir(), "pull-")
	if err != nil {
		return img, fmt.Errorf("create scratch dir: %w", err)
	}
	defer func() {
		if err := os.RemoveAll(scratch); err != nil {
			st.log.Error("remove scratch dir", "dir", scratch, "err", err)
		}
	}()

	start := time.Now()
	pulled, err := imagepull.Pull(ctx, ref.String(), imagepull.PullOptions{
		Cache:    s.layerCache(),
		Keychain: s.keychainFor(uid),
		Progress: report,
	})
	if err != nil {
		return img, classifyPullError(err)
	}
	s.pulls.add(pulled.LayerDigests())
	defer s.pulls.remove(pulled.LayerDigests())
	st.log.Info("resolved image", "digest", pulled.Digest, "layers", len(pulled.Layers()))

	ext4 := filepath.Join(st.dir, "rootfs.ext4")
	runCfg := pulled.Config
	facts, size, err := s.buildRootFS(ctx, pulled, &runCfg, builder, scratch, ext4, size, agent, report, st.log)
	if err != nil {
		return img, err
	}
	img = model.Image{
		ID: st.id, Name: imgName, Ref: ref.String(), Source: "oci", Digest: pulled.Digest,
		Dir: st.final, RootFS: filepath.Join(st.final, "rootfs.ext4"), Size: size,
		Layers: pulled.LayerDigests(), Managed: true, Created: time.Now().UTC(), OwnerUID: uid,
		Config: &runCfg, Init: facts.Init, InitReason: facts.Reason, Notes: facts.Notes(),
	}
	if err := s.publishImage(ctx, &img, kernel, "no --kernel-ref was given", st, ext4, req.Force, report); err != nil {
		return img, err
	}
	st.log.Info("image published", "rootfs", img.RootFS, "size", size, "duration", time.Since(start).Round(time.Millisecond))
	return img, nil
}

// ociTarget checks the reference and the image name of an OCI pull.
func (s *Service) ociTarget(req api.PullRequest, uid uint32) (name.Reference, string, error) {
	ref, err := imagepull.ParseReference(req.Ref)
	if err != nil {
		return nil, "", api.Errorf(api.CodeInvalid, "%v", err)
	}
	imgName := req.Name
	if imgName == "" {
		imgName = imagepull.DefaultImageName(ref)
	}
	if err := model.ValidateName("image", imgName); err != nil {
		return nil, "", api.Errorf(api.CodeInvalid, "%v", err)
	}
	if old, err := s.store.GetImage(imgName); err == nil {
		if !req.Force {
			return nil, "", api.Errorf(api.CodeConflict, "image %q already exists: pass --force to replace it, or --name to pull under another name", imgName)
		}
		if err := mayReplace(uid, "image", imgName, old.OwnerUID); err != nil {
			return nil, "", err
		}
	}
	return ref, imgName, nil
}

// buildRootFS turns a pulled image into the ext4 at ext4 with
// imagepull.BuildImage (the direct builder unless req asks for staging;
// auto falls back to staging with the reason logged), reports which init
// its VMs get (InspectGuest), and runs InjectGuestAgents with the run
// config. It returns what the inspection found and the size used (size 0:
// from the content).
func (s *Service) buildRootFS(ctx context.Context, pulled *imagepull.Image, runCfg *guestabi.ImageConfig, builder imagepull.Builder, scratch, ext4 string,
	size int64, agent string, report progress.Func, log *slog.Logger) (facts imagepull.GuestFacts, _ int64, err error) {
	built, err := imagepull.BuildImage(ctx, pulled, ext4, imagepull.BuildOptions{
		Builder: builder, Size: size, MaxBytes: size, ScratchDir: scratch, Progress: report, Log: log,
	})
	if errors.Is(err, imagepull.ErrSizeTooSmall) {
		return facts, 0, api.Errorf(api.CodeInvalid, "%v", err)
	}
	if err != nil {
		return facts, 0, classifyPullError(err)
	}
	facts, size = built.Facts, built.Size
	log.Info("built rootfs", "builder", built.Builder, "size", size, "fallback", built.Fallback)
	for _, n := range facts.Notes() {
		report.Report(progress.Event{Phase: "init", Message: n})
	}
	report.Report(progress.Event{Phase: "inject", Message: "guest agent, network and first-boot units"})
	if err := imagepull.InjectGuestAgents(ctx, ext4, imagepull.GuestAssets{AgentBinary: agent, Config: runCfg, SSHDReady: facts.SSHDReady}); err != nil {
		return facts, 0, err
	}
	report.Report(progress.Event{Phase: "inject", Done: true})
	return facts, size, nil
}

// staging is an image being built in <images>/<id>.staging, renamed to
// <images>/<id> when it is published.
type staging struct {
	id, dir, final string
	published      bool
	log            *slog.Logger
}

// stage makes the staging dir of a new image.
func (s *Service) stage(log *slog.Logger) (*staging, error) {
	id := model.NewID()
	st := &staging{id: id, dir: filepath.Join(s.cfg.ImagesDir(), id+".staging"), final: filepath.Join(s.cfg.ImagesDir(), id), log: log.With("id", id)}
	if err := os.Mkdir(st.dir, 0o700); err != nil {
		return nil, fmt.Errorf("create staging dir: %w", err)
	}
	return st, nil
}

// end removes the staging dir unless the image was published, and logs a
// pull that failed.
func (st *staging) end(failure error) {
	if !st.published {
		if err := os.RemoveAll(st.dir); err != nil {
			st.log.Error("remove staging dir", "dir", st.dir, "err", err)
		}
	}
	if failure != nil {
		st.log.Info("image pull or refresh failed; nothing was published", "err", failure)
	}
}

// publishImage finishes a pull whose ext4 is built in st: it stages the
// kernel beside it (or notes why there is none), renames the staging dir
// to img.Dir, records img (replacing an image of the same name when force)
// and removes a replaced image's files. Once the rename happened, st's end
// leaves the dir alone.
func (s *Service) publishImage(ctx context.Context, img *model.Image, kernel *model.Kernel, whyNoKernel string, st *staging, ext4 string,
	force bool, report progress.Func) error {
	if kernel != nil {
		boot, err := s.stageBootArtifacts(ctx, *kernel, st.dir, ext4, img.Dir)
		if err != nil {
			return err
		}
		img.Kernel, img.Boot = kernel.Name, &boot
	} else {
		img.Notes = append(img.Notes, "published without boot artifacts: "+whyNoKernel+"; pass --kernel-ref to vm create")
	}
	report.Report(progress.Event{Phase: "publish", Item: img.Name})
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := os.Rename(st.dir, img.Dir); err != nil {
		return fmt.Errorf("publish image: %w", err)
	}
	st.published = true
	old, err := s.store.PutImage(*img, force)
	if err != nil {
		_ = os.RemoveAll(img.Dir)
		if errors.Is(err, store.ErrConflict) {
			return api.Errorf(api.CodeConflict, "image %q was created by another pull meanwhile: pass --force to replace it", img.Name)
		}
		return err
	}
	if old != nil {
		s.retireReplaced(*old, report, st.log)
	}
	report.Report(progress.Event{Phase: "publish", Item: img.Name, Done: true})
	return nil
}

// pullInputs checks what every pull needs before it makes anything: the
// --size, e2fsprogs, the guest agent to inject, and the kernel the user
// named (resolved first, so that a typo fails before any download).
func (s *Service) pullInputs(ctx context.Context, req api.PullRequest, report progress.Func) (size int64, agent string, kernel *model.Kernel, err error) {
	if size, err = units.ParseSize(req.Size); err != nil {
		return 0, "", nil, api.Errorf(api.CodeInvalid, "%v", err)
	}
	if _, err := imagepull.CheckE2fsprogs(ctx); err != nil {
		return 0, "", nil, err
	}
	if agent, err = s.agentBinary(); err != nil {
		return 0, "", nil, err
	}
	if req.KernelRef != "" {
		k, err := s.ResolveKernel(ctx, req.KernelRef, report)
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
func (s *Service) layerCache() *imagepull.Cache {
	s.cacheOnce.Do(func() { s.cache = &imagepull.Cache{Dir: s.cfg.CacheDir} })
	return s.cache
}

// keychainFor reads registry credentials of the calling user (their
// ~/.docker/config.json and credential helpers), never root's on behalf of
// another user.
func (s *Service) keychainFor(uid uint32) authn.Keychain {
	home := ""
	if u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
		home = u.HomeDir
	}
	return imagepull.UserKeychain(home)
}

// agentBinary finds the static guest agent to inject: the configured path,
// else beside the banger executable, else the install locations.
func (s *Service) agentBinary() (string, error) {
	return findHelper(s.cfg.AgentBinary, "banger-vsock-agent", "agent_binary")
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

// RecoverPullLeftovers removes what a pull that died with the daemon left:
// <images>/*.staging dirs and everything in the scratch dir <state>/tmp.
// That dir is private to the daemon (root-owned, no other user may write
// it; privdir.Check refuses it otherwise), so nothing in it can have been
// planted, and nothing in it is read: entries are removed without
// following symlinks.
func (s *Service) RecoverPullLeftovers(_ context.Context) error {
	stagings, _ := filepath.Glob(filepath.Join(s.cfg.ImagesDir(), "*.staging"))
	for _, dir := range stagings {
		if err := os.RemoveAll(dir); err != nil {
			s.log.Error("remove leftover staging dir", "dir", dir, "err", err)
			continue
		}
		s.log.Info("removed leftover staging dir of an interrupted pull", "dir", dir)
	}
	scratch := s.cfg.ScratchDir()
	if err := privdir.Ensure(scratch); err != nil {
		return err
	}
	ents, err := os.ReadDir(scratch)
	if err != nil {
		return fmt.Errorf("read scratch dir: %w", err)
	}
	for _, e := range ents {
		dir := filepath.Join(scratch, e.Name())
		if err := os.RemoveAll(dir); err != nil {
			s.log.Error("remove leftover scratch dir", "dir", dir, "err", err)
			continue
		}
		s.log.Info("removed leftover scratch dir of an interrupted pull", "dir", dir)
	}
	return nil
}

// PruneCache removes the cached layer blobs that no image and no pull in
// progress uses, and returns how many it removed and the bytes freed.
func (s *Service) PruneCache(ctx context.Context) (api.PruneResult, error) {
	imgs, err := s.store.ListImages()
	if err != nil {
		return api.PruneResult{}, err
	}
	keep := map[string]bool{}
	for _, img := range imgs {
		for _, l := range img.Layers {
			keep[l] = true
		}
	}
	s.pulls.mu.Lock()
	for l := range s.pulls.layers {
		keep[l] = true
	}
	s.pulls.mu.Unlock()
	n, freed, err := s.layerCache().Prune(ctx, keep)
	if err != nil {
		return api.PruneResult{}, err
	}
	s.log.Info("layer cache pruned", "blobs", n, "freed", freed)
	return api.PruneResult{Removed: n, Freed: freed}, nil
}
