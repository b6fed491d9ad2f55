package images

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/store"
)

// RefreshAgent gives the image name this banger's guest program without a
// re-pull: a copy of its rootfs gets the current agent binary, its systemd
// units, first-boot script and links (imagepull.RefreshGuestAgent; the
// image's first-boot state, run config and files stay), is checked with
// e2fsck -fn, and is published as a new image of the same name, with the
// kernel triple linked from the old one, through the replace machinery of
// pull --force: VMs made from the old image keep it (retireReplaced). Only
// the image's owner or root may. Any failure or cancellation removes the
// staging dir and leaves the image as it was.
func (s *Service) RefreshAgent(ctx context.Context, name string, uid uint32, report progress.Func) (img model.Image, retErr error) {
	s.refreshMu.Lock()
	defer s.refreshMu.Unlock()
	old, err := s.store.GetImage(name)
	if err != nil {
		return img, err
	}
	if uid != 0 && uid != old.OwnerUID {
		return img, api.Errorf(api.CodeForbidden,
			"image %q belongs to uid %d: only its owner or root may refresh its agent (or pull the image again under another --name)", name, old.OwnerUID)
	}
	if _, err := os.Stat(old.RootFS); err != nil {
		return img, api.Errorf(api.CodeConflict, "image %q has no root filesystem at %s (%v): re-pull it with banger image pull --force", name, old.RootFS, err)
	}
	if _, err := imagepull.CheckE2fsprogs(ctx); err != nil {
		return img, err
	}
	agent, err := s.agentBinary()
	if err != nil {
		return img, err
	}
	st, err := s.stage(s.log.With("image", name, "op", "refresh-agent"))
	if err != nil {
		return img, err
	}
	defer func() { st.end(retErr) }()

	ext4 := filepath.Join(st.dir, "rootfs.ext4")
	report.Report(progress.Event{Phase: "copy", Item: name, Message: "the image's root filesystem"})
	stopProgress := copyProgress(old.RootFS, ext4, name, report)
	how, err := copyRootFS(ctx, old.RootFS, ext4)
	stopProgress()
	if err != nil {
		return img, err
	}
	report.Report(progress.Event{Phase: "copy", Item: name, Message: how, Done: true})
	report.Report(progress.Event{Phase: "inject", Message: "this banger's guest agent, its units and init link"})
	if err := imagepull.RefreshGuestAgent(ctx, ext4, agent); err != nil {
		if errors.Is(err, imagepull.ErrGuestLayout) {
			return img, api.Errorf(api.CodeInvalid, "image %q: %v", name, err)
		}
		return img, err
	}
	report.Report(progress.Event{Phase: "inject", Done: true})
	report.Report(progress.Event{Phase: "check", Message: "e2fsck -fn"})
	if err := imagepull.CheckExt4(ctx, ext4); err != nil {
		return img, fmt.Errorf("the refreshed root filesystem of image %q is not clean; nothing was published: %w", name, err)
	}
	report.Report(progress.Event{Phase: "check", Done: true})

	img = old
	img.ID, img.Dir, img.RootFS = st.id, st.final, filepath.Join(st.final, "rootfs.ext4")
	img.Created = time.Now().UTC()
	img.Notes = append([]string(nil), old.Notes...)
	if old.Boot != nil {
		boot, err := relinkBoot(ctx, old, st.dir, st.final)
		if err != nil {
			return img, err
		}
		img.Boot = &boot
	}
	report.Report(progress.Event{Phase: "publish", Item: img.Name})
	if err := ctx.Err(); err != nil {
		return img, err
	}
	if cur, err := s.store.GetImage(name); err != nil || cur.ID != old.ID {
		return img, api.Errorf(api.CodeConflict, "image %q was replaced while its agent was refreshed: run banger image refresh-agent %s again", name, name)
	}
	if err := os.Rename(st.dir, img.Dir); err != nil {
		return img, fmt.Errorf("publish image: %w", err)
	}
	st.published = true
	replaced, err := s.store.PutImage(img, true)
	if err != nil {
		_ = os.RemoveAll(img.Dir)
		if errors.Is(err, store.ErrConflict) {
			return img, api.Errorf(api.CodeConflict, "image %q changed meanwhile: run banger image refresh-agent %s again", name, name)
		}
		return img, err
	}
	if replaced != nil {
		s.retireReplaced(*replaced, report, st.log)
	}
	report.Report(progress.Event{Phase: "publish", Item: img.Name, Done: true})
	st.log.Info("image agent refreshed", "old_id", old.ID, "copy", how)
	return img, nil
}

// copyProgress reports, every 250 ms until stopped, how much of src's
// data (its allocated bytes: a sparse copy writes only those) dst holds.
func copyProgress(src, dst, item string, report progress.Func) (stop func()) {
	allocated := func(p string) int64 {
		var st unix.Stat_t
		if unix.Stat(p, &st) != nil {
			return 0
		}
		return st.Blocks * 512
	}
	total := allocated(src)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if total > 0 {
					report.Report(progress.Event{Phase: "copy", Item: item, Current: min(allocated(dst), total), Total: total})
				}
			}
		}
	}()
	return func() { close(done); <-finished }
}

// copyRootFS copies src to dst (new): a reflink where the file system
// shares extents, else a sparse copy. It says which; dst is synced.
func copyRootFS(ctx context.Context, src, dst string) (how string, err error) {
	in, err := os.Open(src) //nolint:gosec // an image's rootfs under the images dir, from its record
	if err != nil {
		return "", fmt.Errorf("copy the image's root filesystem: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY|unix.O_CLOEXEC, 0o644) //nolint:gosec // the staging dir
	if err != nil {
		return "", fmt.Errorf("copy the image's root filesystem: %w", err)
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("copy the image's root filesystem: %w", cerr)
		}
	}()
	how = "reflink"
	if rerr := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); rerr != nil {
		how = "sparse copy"
		if err := blockdev.SparseCopy(ctx, out, in); err != nil {
			if ctx.Err() != nil {
				return "", ctx.Err()
			}
			return "", fmt.Errorf("copy %s: %w", src, err)
		}
	}
	if err := out.Sync(); err != nil {
		return "", fmt.Errorf("copy the image's root filesystem: sync: %w", err)
	}
	return how, nil
}

// relinkBoot stages the old image's kernel triple into stagingDir (hard
// links where possible) and returns its paths as they will be under
// finalDir.
func relinkBoot(ctx context.Context, old model.Image, stagingDir, finalDir string) (model.BootArtifacts, error) {
	b := old.Boot
	k := model.Kernel{Name: old.Kernel, Version: b.Version, Kernel: model.Artifact{Path: b.Kernel}}
	if b.Initrd != "" {
		k.Initrd = &model.Artifact{Path: b.Initrd}
	}
	if b.Modules != "" {
		k.Modules = &model.Artifact{Path: b.Modules}
	}
	if k.Name == "" {
		k.Name = old.Name
	}
	boot, err := kernels.StageBootArtifacts(ctx, k, stagingDir)
	if err != nil {
		return boot, fmt.Errorf("image %q: link its kernel into the refreshed image: %w", old.Name, err)
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
