package imagepull

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
)

// directBuild runs the direct builder's two passes into a new image.
func directBuild(t testing.TB, src LayerSource) (string, Metadata) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	tree, err := Scan(ctx, src, dir, FlattenOptions{})
	if err != nil {
		t.Fatalf("Scan: %v", err)
	}
	img := filepath.Join(dir, "rootfs.ext4")
	if err := tree.WriteExt4(ctx, src, img, DefaultSize(DiskUsage(tree.Metadata()))); err != nil {
		t.Fatalf("WriteExt4: %v", err)
	}
	return img, tree.Metadata()
}

// TestDirectDebianRootfs builds the Debian test root filesystem with the
// direct builder and compares every path with the tar.
func TestDirectDebianRootfs(t *testing.T) {
	requireE2fsprogs(t)
	testutil.SkipIfShort(t, "builds a 1 GiB image from the Debian test root filesystem")
	tarPath := testutil.DebianRootfsTar(t, "std", nil)
	start := time.Now()
	img, md := directBuild(t, tarLayer(tarPath))
	t.Logf("%d entries, %d MiB content: direct build %v", len(md), md.ContentBytes()>>20, time.Since(start).Round(time.Millisecond))
	if st, err := os.Stat(img); err != nil || st.Size() != DefaultSize(DiskUsage(md)) {
		t.Errorf("image size %v, %v", st.Size(), err)
	}
	if got, _ := strconv.ParseInt(dumpe2fs(t, img, "Inode count"), 10, 64); got < inodeCount(DefaultSize(DiskUsage(md)), int64(len(md))) {
		t.Errorf("inode count %d, want at least %d (the staging builder's headroom)", got, inodeCount(DefaultSize(DiskUsage(md)), int64(len(md))))
	}
	checkAgainstTar(t, img, tarPath)
}

func TestDirectImageIsANormalExt4(t *testing.T) {
	requireE2fsprogs(t)
	img, md := directBuild(t, memSource{makeTar(t, dir("etc"), file("etc/hostname", "x"))})
	features := dumpe2fs(t, img, "Filesystem features")
	for _, want := range []string{"has_journal", "extent", "filetype"} {
		if !strings.Contains(features, want) {
			t.Errorf("features %q lack %s", features, want)
		}
	}
	if strings.Contains(features, "read-only") {
		t.Errorf("features %q: the image is read-only", features)
	}
	t.Logf("features: %s; inodes %s; blocks %s", features, dumpe2fs(t, img, "Inode count"), dumpe2fs(t, img, "Block count"))
	_ = md
	e2fsckClean(t, img)
}

// TestDirectHostileCorpus: every hostile layer stack is refused by the
// direct builder exactly as Flatten refuses it (same error kind, entry and
// layer), and no image file is left.
func TestDirectHostileCorpus(t *testing.T) {
	reg := newRegistry(t, nil)
	cache := &Cache{Dir: t.TempDir()}
	outside := t.TempDir()
	for _, h := range hostileCorpus(t, outside) {
		t.Run(h.name, func(t *testing.T) {
			ref := reg.pushLayers(t, "hostile/"+strings.ToLower(h.name)+":v1", h.layers...)
			img, err := Pull(context.Background(), ref, PullOptions{Cache: cache})
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			ext4 := filepath.Join(dir, "rootfs.ext4")
			_, err = BuildImage(context.Background(), img, ext4, BuildOptions{Builder: BuilderDirect, ScratchDir: dir, MaxBytes: 1 << 20})
			if !errors.Is(err, h.target) {
				t.Fatalf("BuildImage(direct) = %v, want %v", err, h.target)
			}
			var ee *EntryError
			if !errors.As(err, &ee) || ee.Entry != h.entry || ee.Layer != h.layer {
				t.Errorf("error %v does not name entry %q of layer %d", err, h.entry, h.layer)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("left behind: %v", ents)
			}
		})
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Errorf("written outside: %v", ents)
	}
}

// TestBuildImageFallsBack: with resize2fs missing the direct builder
// cannot finish; auto falls back to staging (and says why), direct alone
// fails with ErrDirectUnsupported, and neither leaves a file behind.
func TestBuildImageFallsBack(t *testing.T) {
	requireE2fsprogs(t)
	bin := t.TempDir()
	for _, prog := range []string{"mkfs.ext4", "mke2fs", "debugfs", "e2fsck", "tune2fs"} {
		p, err := exec.LookPath(prog)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(p, filepath.Join(bin, prog)); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", bin)
	src := memSource{makeTar(t, dir("etc"), file("etc/hostname", "fallback"), entry{name: "dev/null", typ: tar.TypeChar, major: 1, minor: 3, mode: 0o666})}

	dir := t.TempDir()
	_, err := BuildImage(context.Background(), src, filepath.Join(dir, "direct.ext4"), BuildOptions{Builder: BuilderDirect, ScratchDir: dir})
	if !errors.Is(err, ErrDirectUnsupported) || !strings.Contains(err.Error(), "resize2fs") {
		t.Errorf("BuildImage(direct) without resize2fs = %v, want ErrDirectUnsupported naming resize2fs", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
	img := filepath.Join(dir, "auto.ext4")
	built, err := BuildImage(context.Background(), src, img, BuildOptions{ScratchDir: dir})
	if err != nil {
		t.Fatalf("BuildImage(auto): %v", err)
	}
	if built.Builder != BuilderStaging || !strings.Contains(built.Fallback, "resize2fs") {
		t.Errorf("BuildImage(auto) used %q, fallback %q; want staging because resize2fs is missing", built.Builder, built.Fallback)
	}
	got := statPaths(t, img, "/etc/hostname", "/dev/null")
	if got["/dev/null"].Type != "character special" || got["/dev/null"].Major != 1 || got["/etc/hostname"].Type != "regular" {
		t.Errorf("fallback image: %+v", got)
	}
	e2fsckClean(t, img)
}
