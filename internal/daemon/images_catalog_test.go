package daemon_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/testutil"
)

// fakeBzImage writes the smallest file kernels.DetectFormat takes for a
// 64-bit bzImage of the given release.
func fakeBzImage(t *testing.T, p, release string) {
	t.Helper()
	b := make([]byte, 5*512)
	binary.LittleEndian.PutUint16(b[0x1FE:], 0xAA55)
	copy(b[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(b[0x206:], 0x020b)
	binary.LittleEndian.PutUint16(b[0x20E:], 0x300)
	copy(b[0x500:], release+" (test@banger) #1 SMP\x00")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// catalogServer serves a catalog dir on 127.0.0.1, records each request's
// path and Range header, and can cut the first response of a path off.
type catalogServer struct {
	dir   string
	srv   *httptest.Server
	mu    sync.Mutex
	reqs  []string // "path range"
	cutAt map[string]int
	stall chan struct{} // when set, bundles are sent 1000 bytes and then stall until it closes
}

func (c *catalogServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	c.reqs = append(c.reqs, r.URL.Path+" "+r.Header.Get("Range"))
	cut, ok := c.cutAt[r.URL.Path]
	delete(c.cutAt, r.URL.Path)
	stall := c.stall
	c.mu.Unlock()
	if stall != nil && strings.HasSuffix(r.URL.Path, ".bundle") {
		w.Header().Set("Content-Length", "1000000")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(bytes.Repeat([]byte{1}, 1000))
		_ = http.NewResponseController(w).Flush()
		select {
		case <-stall:
		case <-r.Context().Done():
		}
		return
	}
	if ok {
		data, err := os.ReadFile(filepath.Join(c.dir, filepath.FromSlash(r.URL.Path)))
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		conn, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		fmt.Fprintf(bw, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", len(data))
		_, _ = bw.Write(data[:cut])
		_ = bw.Flush()
		_ = conn.Close()
		return
	}
	http.FileServer(http.Dir(c.dir)).ServeHTTP(w, r)
}

func (c *catalogServer) requests() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.reqs...)
}

// catalogFixture builds a catalog dir with "debian-bookworm" (a bundle
// carrying its kernel) and "mini-nokernel" (no kernel, no kernel_ref) from
// a small root filesystem tar, serves it, and starts a daemon using it.
type catalogFixture struct {
	cat    *catalogServer
	s      *daemontest.Started
	client *api.Client
	entry  imagecat.Entry
}

func newCatalogFixture(t *testing.T) *catalogFixture {
	t.Helper()
	testutil.RequiresTool(t, "mkfs.ext4", "debugfs", "e2fsck", "resize2fs")
	work := t.TempDir()
	agent := filepath.Join(work, "banger-vsock-agent")
	if err := os.WriteFile(agent, []byte("#!/bin/sh\n# stand-in agent\n"), 0o755); err != nil { // #nosec G306 -- an executable
		t.Fatal(err)
	}
	kernel := filepath.Join(work, "vmlinuz")
	fakeBzImage(t, kernel, "6.1.0-99-test-amd64")
	dir := filepath.Join(work, "catalog")
	ctx := context.Background()
	e, err := imagecat.BuildFromTar(ctx, imagecat.BuildOptions{
		RootfsTar: testutil.MiniRootfsTar(t, work, "with kernel"), Name: "debian-bookworm", Description: "Debian 12, systemd, sshd",
		AgentBinary: agent, Kernel: kernel, OutDir: dir, Level: zstd.SpeedFastest,
	})
	if err != nil {
		t.Fatalf("BuildFromTar: %v", err)
	}
	if _, err := imagecat.BuildFromTar(ctx, imagecat.BuildOptions{
		RootfsTar: testutil.MiniRootfsTar(t, t.TempDir(), "no kernel"), Name: "mini-nokernel",
		AgentBinary: agent, OutDir: dir, Level: zstd.SpeedFastest,
	}); err != nil {
		t.Fatal(err)
	}
	cat := &catalogServer{dir: dir, cutAt: map[string]int{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cat.srv = &httptest.Server{Listener: ln, Config: &http.Server{Handler: cat, ReadHeaderTimeout: 10 * time.Second}}
	cat.srv.Start()
	t.Cleanup(cat.srv.Close)
	s := daemontest.Start(t, func(c *config.Config) {
		c.ImageCatalog = cat.srv.URL + "/index.json"
		c.AgentBinary = agent
	})
	return &catalogFixture{cat: cat, s: s, client: api.NewClient(s.Config.Socket), entry: e}
}

func (f *catalogFixture) pull(t *testing.T, req api.PullRequest) (model.Image, []progress.Event, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var img model.Image
	var mu sync.Mutex
	var evs []progress.Event
	err := f.client.Stream(ctx, "POST", "/images/pull", req, func(ev progress.Event) {
		mu.Lock()
		evs = append(evs, ev)
		mu.Unlock()
	}, &img)
	return img, evs, err
}

// assertNothingPublished checks that no image record, no image dir and no
// staging dir exist.
func (f *catalogFixture) assertNothingPublished(t *testing.T) {
	t.Helper()
	imgs, err := f.s.D.Store().ListImages()
	if err != nil {
		t.Fatal(err)
	}
	if len(imgs) != 0 {
		t.Errorf("images recorded after a failed pull: %+v", imgs)
	}
	left, _ := os.ReadDir(f.s.Config.ImagesDir())
	for _, e := range left {
		t.Errorf("left in the images dir after a failed pull: %s", e.Name())
	}
}

func apiCode(err error) api.ErrorCode {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae.Code
	}
	return ""
}

func (f *catalogFixture) rewriteIndex(t *testing.T, fn func(*imagecat.Index)) {
	t.Helper()
	p := filepath.Join(f.cat.dir, imagecat.IndexFile)
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var ix imagecat.Index
	if err := json.Unmarshal(data, &ix); err != nil {
		t.Fatal(err)
	}
	fn(&ix)
	if err := imagecat.WriteIndexFile(p, ix); err != nil {
		t.Fatal(err)
	}
}

func TestCatalogPull(t *testing.T) {
	f := newCatalogFixture(t)
	img, evs, err := f.pull(t, api.PullRequest{Ref: "debian-bookworm"})
	if err != nil {
		t.Fatalf("pull debian-bookworm: %v", err)
	}
	if img.Name != "debian-bookworm" || img.Source != "catalog" || img.Ref != "debian-bookworm" ||
		img.Digest != "sha256:"+f.entry.Bundle.SHA256 || img.Kernel != "debian-bookworm-kernel" || img.Boot == nil || !img.Managed {
		t.Errorf("pulled image record = %+v", img)
	}
	if rec, err := f.s.D.Store().GetImage("debian-bookworm"); err != nil || rec.ID != img.ID {
		t.Errorf("store has %+v, %v", rec, err)
	}
	if out, err := exec.Command("e2fsck", "-fn", img.RootFS).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn %s: %v\n%s", img.RootFS, err, out)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(img.RootFS, &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 > st.Size/4 || st.Size != img.Size {
		t.Errorf("rootfs %s: %d bytes allocated of %d (record says %d): want sparse", img.RootFS, st.Blocks*512, st.Size, img.Size)
	}
	if _, err := os.Stat(img.Boot.Kernel); err != nil || !strings.HasPrefix(img.Boot.Kernel, img.Dir+"/") {
		t.Errorf("boot kernel %q: %v", img.Boot.Kernel, err)
	}
	if k, err := f.s.D.Store().GetKernel("debian-bookworm-kernel"); err != nil || k.Version != "6.1.0-99-test-amd64" {
		t.Errorf("bundle kernel record = %+v, %v", k, err)
	}
	phases := map[string]bool{}
	for _, ev := range evs {
		phases[ev.Phase] = true
	}
	for _, p := range []string{"download", "verify", "unpack", "inject", "publish"} {
		if !phases[p] {
			t.Errorf("no %q progress event in %v", p, phases)
		}
	}
	if m, _ := filepath.Glob(filepath.Join(f.s.Config.CacheDir, "catalog", "*.bundle")); len(m) != 0 {
		t.Errorf("downloaded bundle kept after publishing: %v", m)
	}

	// The catalog listing marks it pulled.
	var list []api.CatalogListing
	if err := f.client.Do(context.Background(), "GET", "/images/catalog", nil, &list); err != nil {
		t.Fatal(err)
	}
	got := map[string]api.CatalogListing{}
	for _, l := range list {
		got[l.Name] = l
	}
	if l := got["debian-bookworm"]; !l.Pulled || !l.Current || fmt.Sprint(l.Images) != "[debian-bookworm]" || l.OS.ID != "debian" {
		t.Errorf("listing of debian-bookworm = %+v", l)
	}
	if l, ok := got["mini-nokernel"]; !ok || l.Pulled {
		t.Errorf("listing of mini-nokernel = %+v (present %v), want not pulled", l, ok)
	}

	// A name that is a local image and a catalog entry: conflict, then --force.
	if _, _, err := f.pull(t, api.PullRequest{Ref: "debian-bookworm"}); apiCode(err) != api.CodeConflict || !strings.Contains(err.Error(), "--force") {
		t.Errorf("second pull = %v, want a conflict naming --force", err)
	}
	img2, _, err := f.pull(t, api.PullRequest{Ref: "debian-bookworm", Force: true, Size: "2G"})
	if err != nil {
		t.Fatalf("forced pull with --size 2G: %v", err)
	}
	if _, err := os.Stat(img.Dir); !os.IsNotExist(err) {
		t.Errorf("replaced image dir %s still exists: %v", img.Dir, err)
	}
	if st, err := os.Stat(img2.RootFS); err != nil || st.Size() != 2<<30 || img2.Size != 2<<30 {
		t.Errorf("grown rootfs: %v, %v, record %d", st, err, img2.Size)
	}
	if out, err := exec.Command("e2fsck", "-fn", img2.RootFS).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn of the grown rootfs: %v\n%s", err, out)
	}

	// No kernel anywhere: published with a note.
	img3, _, err := f.pull(t, api.PullRequest{Ref: "mini-nokernel"})
	if err != nil {
		t.Fatal(err)
	}
	if img3.Boot != nil || len(img3.Notes) == 0 {
		t.Errorf("image without a kernel = %+v, want no boot artifacts and a note", img3)
	}
}

func TestCatalogPullUnknownNameListsEntries(t *testing.T) {
	f := newCatalogFixture(t)
	_, _, err := f.pull(t, api.PullRequest{Ref: "fedora-40"})
	if apiCode(err) != api.CodeNotFound || !strings.Contains(err.Error(), "debian-bookworm, mini-nokernel") {
		t.Fatalf("pull fedora-40 = %v, want not found listing debian-bookworm, mini-nokernel", err)
	}
	f.assertNothingPublished(t)
}

func TestCatalogPullChecksumMismatchPublishesNothing(t *testing.T) {
	f := newCatalogFixture(t)
	f.rewriteIndex(t, func(ix *imagecat.Index) {
		ix.Entries[0].Bundle.SHA256 = strings.Repeat("0", 64)
	})
	_, _, err := f.pull(t, api.PullRequest{Ref: "debian-bookworm"})
	if err == nil || !strings.Contains(err.Error(), "sha256") {
		t.Fatalf("pull with a wrong sha256 = %v, want a sha256 mismatch", err)
	}
	f.assertNothingPublished(t)
	left, _ := os.ReadDir(filepath.Join(f.s.Config.CacheDir, "catalog"))
	for _, e := range left {
		if !strings.HasSuffix(e.Name(), ".lock") {
			t.Errorf("left in the download cache after a mismatch: %s", e.Name())
		}
	}
	if _, err := f.s.D.Store().GetKernel("debian-bookworm-kernel"); err == nil {
		t.Error("a kernel was recorded from a bundle that failed verification")
	}
}

func TestCatalogPullResumesCutOffDownload(t *testing.T) {
	f := newCatalogFixture(t)
	path := "/" + f.entry.Bundle.URL
	half := int(f.entry.Bundle.Size / 2)
	f.cat.mu.Lock()
	f.cat.cutAt[path] = half
	f.cat.mu.Unlock()
	if _, _, err := f.pull(t, api.PullRequest{Ref: "debian-bookworm"}); err != nil {
		t.Fatalf("pull with a download cut off halfway: %v", err)
	}
	var bundleReqs []string
	for _, r := range f.cat.requests() {
		if strings.HasPrefix(r, path+" ") {
			bundleReqs = append(bundleReqs, r)
		}
	}
	want := []string{path + " ", fmt.Sprintf("%s bytes=%d-", path, half)}
	if fmt.Sprint(bundleReqs) != fmt.Sprint(want) {
		t.Errorf("bundle requests = %q, want %q (resume with a Range from the cut)", bundleReqs, want)
	}
}

func TestCatalogPullTruncatedBundle(t *testing.T) {
	f := newCatalogFixture(t)
	// The catalog publishes a truncated bundle with a matching sha256: the
	// download verifies, the unpack must fail clearly.
	p := filepath.Join(f.cat.dir, filepath.FromSlash(f.entry.Bundle.URL))
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data[:len(data)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	size, sum, err := imagecat.HashFile(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	f.rewriteIndex(t, func(ix *imagecat.Index) {
		ix.Entries[0].Bundle.SHA256, ix.Entries[0].Bundle.Size = sum, size
	})
	_, _, err = f.pull(t, api.PullRequest{Ref: "debian-bookworm"})
	if apiCode(err) != api.CodeInvalid || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("pull of a truncated bundle = %v, want an invalid-input error saying truncated", err)
	}
	f.assertNothingPublished(t)
	if m, _ := filepath.Glob(filepath.Join(f.s.Config.CacheDir, "catalog", "*.bundle")); len(m) != 0 {
		t.Errorf("an unusable bundle stays cached: %v", m)
	}
}

func TestCatalogPullUnknownKernelRefPublishesNothing(t *testing.T) {
	f := newCatalogFixture(t)
	_, _, err := f.pull(t, api.PullRequest{Ref: "mini-nokernel", KernelRef: "no-such-kernel"})
	if apiCode(err) != api.CodeNotFound {
		t.Fatalf("pull with an unknown --kernel-ref = %v, want not found", err)
	}
	f.assertNothingPublished(t)
	for _, r := range f.cat.requests() {
		if strings.HasSuffix(strings.Fields(r)[0], ".bundle") {
			t.Errorf("bundle downloaded although the kernel ref was unknown: %s", r)
		}
	}
}

func TestCatalogPullCancelledLeavesNoStaging(t *testing.T) {
	f := newCatalogFixture(t)
	// The server stalls the bundle, the client gives up.
	stall := make(chan struct{})
	t.Cleanup(func() { close(stall) })
	f.cat.mu.Lock()
	f.cat.stall = stall
	f.cat.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		errc <- f.client.Stream(ctx, "POST", "/images/pull", api.PullRequest{Ref: "debian-bookworm"}, func(ev progress.Event) {
			if ev.Phase == "download" && ev.Current > 0 {
				cancel()
			}
		}, nil)
	}()
	select {
	case <-errc:
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("pull did not end after the client cancelled")
	}
	cancel()
	// The daemon cleans up once it notices; give it a moment.
	deadline := time.Now().Add(10 * time.Second)
	for {
		left, _ := os.ReadDir(f.s.Config.ImagesDir())
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("staging left after a cancelled pull: %v", left)
		}
		time.Sleep(50 * time.Millisecond)
	}
	f.assertNothingPublished(t)
}
