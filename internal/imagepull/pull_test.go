package imagepull

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/bangerdev/banger/internal/progress"
)

type progressEvent = progress.Event

func nopLogger() *log.Logger { return log.New(io.Discard, "", 0) }

// entry is one tar entry a test layer holds.
type entry struct {
	name     string
	typ      byte // tar.Type*; 0 means TypeReg
	body     string
	link     string
	mode     int64
	uid, gid int
	major    int64
	minor    int64
	xattrs   map[string]string
}

func file(name, body string) entry {
	return entry{name: name, typ: tar.TypeReg, body: body, mode: 0o644}
}
func dir(name string) entry { return entry{name: name, typ: tar.TypeDir, mode: 0o755} }
func symlink(name, target string) entry {
	return entry{name: name, typ: tar.TypeSymlink, link: target, mode: 0o777}
}
func hardlink(name, target string) entry {
	return entry{name: name, typ: tar.TypeLink, link: target, mode: 0o644}
}

// makeTar writes entries as an uncompressed tar. Names that only GNU tar
// can carry (long, non-UTF-8) use the GNU format; xattrs use PAX.
func makeTar(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		typ := e.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		h := &tar.Header{Name: e.name, Typeflag: typ, Linkname: e.link, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			Devmajor: e.major, Devminor: e.minor, ModTime: time.Unix(1700000000, 0)}
		if typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if len(e.xattrs) > 0 {
			h.Format = tar.FormatPAX
			h.PAXRecords = map[string]string{}
			for k, v := range e.xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		} else {
			h.Format = tar.FormatGNU
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("tar header %q: %v", e.name, err)
		}
		if typ == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// testRegistry is an in-process registry on 127.0.0.1 (plain HTTP, as
// go-containerregistry does for loopback without any Insecure option).
type testRegistry struct {
	srv  *httptest.Server
	host string
}

func newRegistry(t testing.TB, wrap func(http.Handler) http.Handler) *testRegistry {
	t.Helper()
	h := http.Handler(registry.New(registry.Logger(nopLogger())))
	if wrap != nil {
		h = wrap(h)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return &testRegistry{srv: srv, host: strings.TrimPrefix(srv.URL, "http://")}
}

// buildImage makes a linux/amd64 image from uncompressed layer tars.
func buildImage(t testing.TB, arch string, layers ...[]byte) v1.Image {
	t.Helper()
	img := empty.Image
	for _, l := range layers {
		data := l
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(data)), nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			t.Fatal(err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// push writes img to the registry as repo:tag and returns the reference.
func (r *testRegistry) push(t testing.TB, repo string, img v1.Image) string {
	t.Helper()
	ref := r.host + "/" + repo
	tag, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(tag, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return ref
}

// pushLayers pushes a linux/amd64 image made of the given layer tars.
func (r *testRegistry) pushLayers(t testing.TB, repo string, layers ...[]byte) string {
	t.Helper()
	return r.push(t, repo, buildImage(t, "amd64", layers...))
}

// pullFlatten pulls ref into cache and flattens it into a new staging dir
// that has an empty sibling "outside" dir.
func pullFlatten(t testing.TB, cache *Cache, ref string, opts FlattenOptions) (Metadata, string, error) {
	t.Helper()
	ctx := context.Background()
	img, err := Pull(ctx, ref, PullOptions{Cache: cache})
	if err != nil {
		t.Fatalf("Pull(%s): %v", ref, err)
	}
	base := t.TempDir()
	staging := filepath.Join(base, "staging")
	for _, d := range []string{staging, filepath.Join(base, "outside")} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	md, err := Flatten(ctx, img, staging, opts)
	return md, staging, err
}

func TestPullPicksAmd64FromIndex(t *testing.T) {
	reg := newRegistry(t, nil)
	amd := buildImage(t, "amd64", makeTar(t, file("which", "amd64")))
	arm := buildImage(t, "arm64", makeTar(t, file("which", "arm64")))
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}}},
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
	)
	ref, _ := name.ParseReference(reg.host + "/multi:v1")
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatal(err)
	}
	img, err := Pull(context.Background(), ref.String(), PullOptions{Cache: &Cache{Dir: t.TempDir()}})
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	want, _ := amd.Digest()
	idxDigest, _ := idx.Digest()
	if img.Digest != want.String() || img.IndexDigest != idxDigest.String() {
		t.Errorf("Pull digests = %s (index %s), want %s (index %s)", img.Digest, img.IndexDigest, want, idxDigest)
	}
	staging := t.TempDir()
	if _, err := Flatten(context.Background(), img, staging, FlattenOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(staging, "which")); string(got) != "amd64" {
		t.Errorf("flattened the %q variant, want amd64", got)
	}
}

func TestPullIndexWithoutAmd64ListsPlatforms(t *testing.T) {
	reg := newRegistry(t, nil)
	arm := buildImage(t, "arm64", makeTar(t, file("a", "a")))
	s390 := buildImage(t, "s390x", makeTar(t, file("b", "b")))
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}}},
		mutate.IndexAddendum{Add: s390, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "s390x"}}},
	)
	ref, _ := name.ParseReference(reg.host + "/noamd:v1")
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatal(err)
	}
	_, err := Pull(context.Background(), ref.String(), PullOptions{Cache: &Cache{Dir: t.TempDir()}})
	if !errors.Is(err, ErrPlatformNotFound) {
		t.Fatalf("Pull = %v, want ErrPlatformNotFound", err)
	}
	for _, p := range []string{"linux/arm64/v8", "linux/s390x"} {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not list platform %s", err, p)
		}
	}
}

func TestPullSingleManifestOtherArch(t *testing.T) {
	reg := newRegistry(t, nil)
	ref := reg.push(t, "armonly:v1", buildImage(t, "arm64", makeTar(t, file("a", "a"))))
	_, err := Pull(context.Background(), ref, PullOptions{Cache: &Cache{Dir: t.TempDir()}})
	if !errors.Is(err, ErrPlatformNotFound) || !strings.Contains(err.Error(), "linux/arm64") {
		t.Fatalf("Pull = %v, want ErrPlatformNotFound naming linux/arm64", err)
	}
}

func TestPullReportsDownloadProgress(t *testing.T) {
	reg := newRegistry(t, nil)
	ref := reg.pushLayers(t, "prog:v1", makeTar(t, file("a", strings.Repeat("x", 1<<20))), makeTar(t, file("b", "b")))
	var mu sync.Mutex
	done := map[string]int64{}
	report := func(ev progressEvent) {
		mu.Lock()
		defer mu.Unlock()
		if ev.Phase == "download" && ev.Done {
			done[ev.Item] = ev.Current
		}
	}
	img, err := Pull(context.Background(), ref, PullOptions{Cache: &Cache{Dir: t.TempDir()}, Progress: report})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Flatten(context.Background(), img, t.TempDir(), FlattenOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, l := range img.Layers() {
		if done[l.Digest] != l.Size {
			t.Errorf("download of %s reported %d bytes done, want %d", l.Digest, done[l.Digest], l.Size)
		}
	}
}

func TestPullRejectsBadReference(t *testing.T) {
	for _, ref := range []string{"", "UPPER/case:x", "a b:c", "reg.io/x:tag\n!touch", strings.Repeat("a", 600)} {
		if _, err := Pull(context.Background(), ref, PullOptions{Cache: &Cache{Dir: t.TempDir()}}); !errors.Is(err, ErrInvalidReference) {
			t.Errorf("Pull(%q) = %v, want ErrInvalidReference", ref, err)
		}
	}
}
