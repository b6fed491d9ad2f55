package imagepull

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

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

// debugfsCat is the content of path in img.
func debugfsCat(t *testing.T, img, path string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", "cat "+path, img).Output()
	if err != nil {
		t.Fatalf("debugfs cat %s: %v", path, err)
	}
	return string(out)
}

// countingSource counts OpenLayer calls.
type countingSource struct {
	memSource
	opens map[int]int
}

func (c countingSource) OpenLayer(ctx context.Context, i int) (io.ReadCloser, error) {
	c.opens[i]++
	return c.memSource.OpenLayer(ctx, i)
}

// TestDirectSpools: Scan keeps each layer's decompressed tar in a spool
// beside the image and WriteExt4 reads the bodies from it, so each layer
// is opened (decompressed) once; no spool is left afterwards. With a
// budget too small for the spools (half of it) each layer is read again
// instead, and the image is the same.
func TestDirectSpools(t *testing.T) {
	requireE2fsprogs(t)
	big := strings.Repeat("0123456789abcdef", 64<<10) // 1 MiB
	layers := memSource{
		makeTar(t, dir("etc"), file("etc/hostname", "one"), file("big", big)),
		makeTar(t, file("etc/hostname", "two"), file("etc/.wh.gone", ""), file("more", big[:600<<10])),
	}
	ctx := context.Background()
	build := func(maxBytes int64) (map[string]string, map[int]int) {
		src := countingSource{layers, map[int]int{}}
		dir := t.TempDir()
		tree, err := Scan(ctx, src, dir, FlattenOptions{MaxBytes: maxBytes})
		if err != nil {
			t.Fatal(err)
		}
		spools, _ := filepath.Glob(filepath.Join(dir, ".layer-*.tar"))
		img := filepath.Join(dir, "rootfs.ext4")
		if err := tree.WriteExt4(ctx, src, img, DefaultSize(DiskUsage(tree.Metadata()))); err != nil {
			t.Fatal(err)
		}
		if left, _ := filepath.Glob(filepath.Join(dir, ".layer-*.tar")); len(left) != 0 {
			t.Errorf("spools left after WriteExt4: %v", left)
		}
		e2fsckClean(t, img)
		t.Logf("budget %d: %d spools after Scan, opens %v", maxBytes, len(spools), src.opens)
		out := map[string]string{}
		for _, p := range []string{"/etc/hostname", "/big", "/more"} {
			out[p] = debugfsCat(t, img, p)
		}
		return out, src.opens
	}
	spooled, opens := build(0)
	if opens[0] != 1 || opens[1] != 1 {
		t.Errorf("with room for spools, layers opened %v; want each once", opens)
	}
	again, opens := build(3 << 20) // 1.5 MiB of spools: layer 1's would pass it
	if opens[0] != 1 || opens[1] != 2 {
		t.Errorf("with room for one spool, layers opened %v; want layer 0 once, layer 1 twice", opens)
	}
	if !cmp.Equal(spooled, again) || spooled["/etc/hostname"] != "two" || len(spooled["/big"]) != len(big) {
		t.Errorf("images differ or are wrong: spooled %d/%q, re-read %d/%q", len(spooled["/big"]), spooled["/etc/hostname"], len(again["/big"]), again["/etc/hostname"])
	}
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

// TestGoTarTestdata uses each of Go's own archive/tar test files as a
// one-layer image. Where Flatten refuses a file, Scan refuses it too.
// Where it accepts one, both builders must agree (compareBuilders), every
// symlink has mode 0777, and the direct image must match GNU tar's
// extraction by umoci as root wherever umoci accepts the file.
func TestGoTarTestdata(t *testing.T) {
	testutil.RequiresRoot(t)
	testutil.RequiresLoop(t)
	testutil.RequiresTool(t, "umoci", "mount", "umount", "mkfs.ext4", "debugfs", "e2fsck", "resize2fs", "tune2fs")
	out, err := exec.Command("go", "env", "GOROOT").Output()
	if err != nil {
		t.Fatalf("go env GOROOT: %v", err)
	}
	files, _ := filepath.Glob(filepath.Join(strings.TrimSpace(string(out)), "src", "archive", "tar", "testdata", "*.tar"))
	if len(files) < 20 {
		t.Fatalf("found %d archive/tar test files", len(files))
	}
	accepted := 0
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			src := memSource{data}
			base := t.TempDir()
			staging := filepath.Join(base, "staging")
			if err := os.Mkdir(staging, 0o700); err != nil {
				t.Fatal(err)
			}
			md, ferr := Flatten(context.Background(), src, staging, FlattenOptions{})
			tr, serr := Scan(context.Background(), src, base, FlattenOptions{})
			if tr != nil {
				tr.Close()
			}
			if (ferr == nil) != (serr == nil) {
				t.Fatalf("Flatten = %v but Scan = %v", ferr, serr)
			}
			if ferr != nil {
				t.Logf("refused: %v", ferr)
				return
			}
			accepted++
			got := compareBuilders(t, src, staging, md)
			if got == nil {
				t.Fatal("the direct builder could not build it")
			}
			delete(got, "lost+found")
			delete(got, ".")
			for p, r := range got {
				if r.Type&fs.ModeSymlink != 0 && r.Mode != 0o777 {
					t.Errorf("symlink %q has mode %o, want 0777", p, r.Mode)
				}
			}
			ref, ok := umociUnpack(t, data, filepath.Join(base, "umoci"))
			if !ok {
				return
			}
			want := walkTree(t, ref)
			delete(want, ".")
			// umoci never restores security.selinux (on purpose: the
			// host's policy decides labels); banger writes the image's.
			dropXattr(want, "security.selinux")
			dropXattr(got, "security.selinux")
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("direct image differs from umoci's extraction as root (-umoci +banger):\n%s", diff)
			}
		})
	}
	t.Logf("%d of %d files accepted", accepted, len(files))
}

// umociUnpack writes a one-layer OCI layout of layer under dir and
// unpacks it with umoci as root; ok is false (logged) when umoci refuses.
func umociUnpack(t *testing.T, layer []byte, dir string) (string, bool) {
	t.Helper()
	lp, err := layout.Write(filepath.Join(dir, "layout"), empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layer)), nil }, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	if img, err = mutate.AppendLayers(img, l); err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "test"})); err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Join(dir, "bundle")
	if out, err := exec.Command("umoci", "unpack", "--image", filepath.Join(dir, "layout")+":test", bundle).CombinedOutput(); err != nil {
		t.Logf("umoci refuses it (%v: %s); compared with the staging builder only", err, strings.TrimSpace(string(out)))
		return "", false
	}
	return filepath.Join(bundle, "rootfs"), true
}

// dropXattr removes the xattr name from every record.
func dropXattr(recs map[string]fileRecord, name string) {
	for p, r := range recs {
		var keep []string
		for _, kv := range strings.Split(r.Xattrs, ";") {
			if kv != "" && !strings.HasPrefix(kv, name+"=") {
				keep = append(keep, kv)
			}
		}
		r.Xattrs = strings.Join(keep, ";")
		recs[p] = r
	}
}
