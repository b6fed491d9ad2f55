package kernelcat_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/kernels/kernelcat"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

var shared struct {
	dir  string
	once sync.Once
	err  error
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "banger-kernelcat-test-")
	if err != nil {
		panic(err)
	}
	shared.dir = dir
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// catalogDir builds, once, a catalog holding "generic-6.1" from the Debian
// cloud kernel package with scripts/kernelcat-build.
func catalogDir(t *testing.T) string {
	t.Helper()
	deb := testutil.DebianKernelDeb(t)
	testutil.RequiresTool(t, "go", "depmod", "sh")
	out := filepath.Join(shared.dir, "catalog")
	shared.once.Do(func() {
		script, err := filepath.Abs("../../../scripts/kernelcat-build")
		if err != nil {
			shared.err = err
			return
		}
		cmd := exec.Command(script, deb, "generic-6.1", out)
		if b, err := cmd.CombinedOutput(); err != nil {
			shared.err = errors.New(err.Error() + ": " + string(b))
		}
	})
	if shared.err != nil {
		t.Fatalf("scripts/kernelcat-build: %v", shared.err)
	}
	return out
}

// server serves dir, recording each request, and can cut the first
// response of one path halfway.
type server struct {
	*httptest.Server
	mu       sync.Mutex
	requests []recorded
	cut      map[string]bool // path -> cut its next response
	rewrite  func(path string, body []byte) []byte
}

type recorded struct{ Path, Range string }

func newServer(t *testing.T, dir string) *server {
	s := &server{cut: map[string]bool{}}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.requests = append(s.requests, recorded{r.URL.Path, r.Header.Get("Range")})
		cut := s.cut[r.URL.Path]
		delete(s.cut, r.URL.Path)
		rewrite := s.rewrite
		s.mu.Unlock()
		p := filepath.Join(dir, filepath.FromSlash(strings.TrimPrefix(r.URL.Path, "/")))
		data, err := os.ReadFile(p)
		if err != nil {
			http.NotFound(w, r)
			return
		}
		if rewrite != nil {
			data = rewrite(r.URL.Path, data)
		}
		if cut {
			w.Header().Set("Content-Length", itoa(len(data)))
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(data[:len(data)/2])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler) // drop the connection mid-body
		}
		http.ServeContent(w, r, filepath.Base(p), fixedTime, strings.NewReader(string(data)))
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *server) reqs() []recorded {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]recorded(nil), s.requests...)
}

func TestFetchAndPull(t *testing.T) {
	dir := catalogDir(t)
	srv := newServer(t, dir)
	ix, err := kernelcat.Fetch(context.Background(), srv.URL+"/index.json")
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	e, ok := ix.Lookup("generic-6.1")
	if !ok || e.Initrd == nil || e.Modules == nil || !strings.HasPrefix(e.Kernel.URL, srv.URL+"/generic-6.1/") {
		t.Fatalf("index entry = %+v, %v", e, ok)
	}
	work := t.TempDir()
	var events int
	k, err := kernelcat.Pull(context.Background(), e, filepath.Join(work, "kernels", "generic-6.1"), filepath.Join(work, "cache"), func(ev progressEvent) { events++ })
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	if k.Source != kernels.SourceCatalog || k.Version != e.Version || k.Kernel.SHA256 != e.Kernel.SHA256 || k.Initrd.SHA256 != e.Initrd.SHA256 || k.Modules == nil {
		t.Errorf("pulled kernel = %+v; entry %+v", k, e)
	}
	if _, err := os.Stat(filepath.Join(k.Modules.Path, "kernel", "drivers", "block", "virtio_blk.ko")); err != nil {
		t.Errorf("modules tree not extracted: %v", err)
	}
	if events == 0 {
		t.Error("no progress events")
	}
	// A second pull to the same place is refused.
	if _, err := kernelcat.Pull(context.Background(), e, k.Dir, filepath.Join(work, "cache"), nil); !errors.Is(err, kernels.ErrExists) {
		t.Errorf("second Pull: %v, want ErrExists", err)
	}
	// file:// catalogs work the same way.
	fix, err := kernelcat.Fetch(context.Background(), "file://"+filepath.Join(dir, "index.json"))
	if err != nil {
		t.Fatalf("Fetch(file://): %v", err)
	}
	fe, _ := fix.Lookup("generic-6.1")
	fk, err := kernelcat.Pull(context.Background(), fe, filepath.Join(work, "kernels", "from-file"), filepath.Join(work, "cache2"), nil)
	if err != nil || fk.Kernel.SHA256 != k.Kernel.SHA256 || fk.Modules.SHA256 != k.Modules.SHA256 {
		t.Errorf("Pull(file://) = %+v, %v", fk, err)
	}
}

func TestPullChecksumMismatchPublishesNothing(t *testing.T) {
	dir := catalogDir(t)
	srv := newServer(t, dir)
	srv.rewrite = func(path string, body []byte) []byte {
		if path != "/generic-6.1/initrd" {
			return body
		}
		bad := append([]byte(nil), body...)
		bad[len(bad)/2] ^= 0xff // same size, one byte flipped
		return bad
	}
	ix, err := kernelcat.Fetch(context.Background(), srv.URL+"/index.json")
	if err != nil {
		t.Fatal(err)
	}
	e, _ := ix.Lookup("generic-6.1")
	work := t.TempDir()
	dst := filepath.Join(work, "kernels", "generic-6.1")
	cache := filepath.Join(work, "cache")
	_, err = kernelcat.Pull(context.Background(), e, dst, cache, nil)
	if !errors.Is(err, kernelcat.ErrChecksum) {
		t.Fatalf("Pull with a tampered initrd: err = %v, want ErrChecksum", err)
	}
	if _, serr := os.Stat(dst); serr == nil {
		t.Errorf("a kernel was published at %s despite the mismatch", dst)
	}
	ents, _ := os.ReadDir(filepath.Join(work, "kernels"))
	for _, en := range ents {
		t.Errorf("left in kernels dir: %s", en.Name())
	}
	if _, serr := os.Stat(filepath.Join(cache, e.Initrd.SHA256+".partial")); serr == nil {
		t.Error("the bad partial download was kept")
	}
	if _, serr := os.Stat(filepath.Join(cache, e.Initrd.SHA256)); serr == nil {
		t.Error("the bad download was cached under the good sha")
	}
}

func TestPullResumesInterruptedDownload(t *testing.T) {
	dir := catalogDir(t)
	srv := newServer(t, dir)
	srv.cut["/generic-6.1/kernel"] = true
	ix, err := kernelcat.Fetch(context.Background(), srv.URL+"/index.json")
	if err != nil {
		t.Fatal(err)
	}
	e, _ := ix.Lookup("generic-6.1")
	work := t.TempDir()
	k, err := kernelcat.Pull(context.Background(), e, filepath.Join(work, "k"), filepath.Join(work, "cache"), nil)
	if err != nil {
		t.Fatalf("Pull after a cut connection: %v", err)
	}
	var kernelReqs []recorded
	for _, r := range srv.reqs() {
		if r.Path == "/generic-6.1/kernel" {
			kernelReqs = append(kernelReqs, r)
		}
	}
	if len(kernelReqs) != 2 || kernelReqs[0].Range != "" || !strings.HasPrefix(kernelReqs[1].Range, "bytes=") || kernelReqs[1].Range == "bytes=0-" {
		t.Fatalf("kernel requests = %+v; want a plain GET then one with a Range from the cut", kernelReqs)
	}
	want := "bytes=" + itoa(int(e.Kernel.Size/2)) + "-"
	if kernelReqs[1].Range != want {
		t.Errorf("resume Range = %q, want %q", kernelReqs[1].Range, want)
	}
	got, err := kernels.HashFile(k.Kernel.Path)
	if err != nil || got.SHA256 != e.Kernel.SHA256 {
		t.Errorf("resumed kernel sha = %s (%v), want %s", got.SHA256, err, e.Kernel.SHA256)
	}
}

// mapStore is a minimal kernels.LocalKernels.
type mapStore map[string]model.Kernel

func (m mapStore) LookupKernel(n string) (model.Kernel, bool) { k, ok := m[n]; return k, ok }
func (m mapStore) KernelNames() []string {
	var out []string
	for n := range m {
		out = append(out, n)
	}
	return out
}

func TestResolveKernelInputsAutoPull(t *testing.T) {
	dir := catalogDir(t)
	srv := newServer(t, dir)
	work := t.TempDir()
	cat := &kernelcat.Catalog{IndexURL: srv.URL + "/index.json", KernelsDir: filepath.Join(work, "kernels"), CacheDir: filepath.Join(work, "cache")}
	store := mapStore{"mine": {Name: "mine"}}

	k, err := kernels.ResolveKernelInputs(context.Background(), "generic-6.1", store, cat)
	if err != nil || k.Name != "generic-6.1" || k.Source != kernels.SourceCatalog {
		t.Fatalf("ResolveKernelInputs(generic-6.1) = %+v, %v", k, err)
	}
	store[k.Name] = k
	before := len(srv.reqs())
	k2, err := kernels.ResolveKernelInputs(context.Background(), "generic-6.1", store, cat)
	if err != nil || k2.Dir != k.Dir || len(srv.reqs()) != before {
		t.Errorf("second resolve = %+v, %v, %d new requests; want the local kernel and no HTTP", k2, err, len(srv.reqs())-before)
	}
	_, err = kernels.ResolveKernelInputs(context.Background(), "nope-9", store, cat)
	if !errors.Is(err, kernels.ErrKernelNotFound) || !strings.Contains(err.Error(), "generic-6.1, mine") || !strings.Contains(err.Error(), "catalog: generic-6.1") {
		t.Errorf("ResolveKernelInputs(nope-9) err = %v; want ErrKernelNotFound listing local and catalog names", err)
	}
}

func TestFetchRejectsBadIndexes(t *testing.T) {
	good := `{"url":"k","sha256":"` + strings.Repeat("a", 64) + `","size":10}`
	for _, tc := range []struct{ name, body string }{
		{"schema", `{"schema":2,"entries":[]}`},
		{"bad name", `{"schema":1,"entries":[{"name":"../x","version":"1","arch":"x86_64","kernel":` + good + `}]}`},
		{"bad sha", `{"schema":1,"entries":[{"name":"x","version":"1","arch":"x86_64","kernel":{"url":"k","sha256":"zz","size":1}}]}`},
		{"file url from http index", `{"schema":1,"entries":[{"name":"x","version":"1","arch":"x86_64","kernel":{"url":"file:///etc/shadow","sha256":"` + strings.Repeat("a", 64) + `","size":1}}]}`},
		{"arch", `{"schema":1,"entries":[{"name":"x","version":"1","arch":"arm64","kernel":` + good + `}]}`},
		{"duplicate", `{"schema":1,"entries":[{"name":"x","version":"1","arch":"x86_64","kernel":` + good + `},{"name":"x","version":"1","arch":"x86_64","kernel":` + good + `}]}`},
		{"not json", `<html>`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte(tc.body)) }))
			defer srv.Close()
			if _, err := kernelcat.Fetch(context.Background(), srv.URL+"/index.json"); err == nil {
				t.Errorf("Fetch(%s) accepted %s", tc.name, tc.body)
			}
		})
	}
	// A valid index round-trips.
	var ix kernelcat.Index
	if err := json.Unmarshal([]byte(`{"schema":1,"entries":[{"name":"x","version":"1","arch":"x86_64","kernel":`+good+`}]}`), &ix); err != nil {
		t.Fatal(err)
	}
}
