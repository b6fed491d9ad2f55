package download

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/progress"
)

// fetchTo fetches f into dir as <sha256>.bundle, as the image catalog
// does, and returns the path.
func fetchTo(ctx context.Context, f File, dir string, pf progress.Func) (string, error) {
	final := filepath.Join(dir, f.SHA256+".bundle")
	if err := Fetch(ctx, f, final, Options{Item: "bundle", Progress: pf}); err != nil {
		return "", err
	}
	return final, nil
}

// localServer serves on 127.0.0.1 only.
func localServer(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &httptest.Server{Listener: ln, Config: &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// cutServer serves blob; the first request gets a 200 whose connection
// drops after cutAt bytes, later ones are served with Range support. It
// records every request's Range header.
type cutServer struct {
	blob   []byte
	cutAt  int
	mu     sync.Mutex
	ranges []string
}

func (c *cutServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	c.ranges = append(c.ranges, r.Header.Get("Range"))
	n := len(c.ranges)
	c.mu.Unlock()
	if n == 1 {
		conn, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		fmt.Fprintf(bw, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n", len(c.blob))
		_, _ = bw.Write(c.blob[:c.cutAt])
		_ = bw.Flush()
		_ = conn.Close()
		return
	}
	http.ServeContent(w, r, "bundle", time.Time{}, bytes.NewReader(c.blob))
}

func TestFetchResumesAfterCutOff(t *testing.T) {
	blob := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	cs := &cutServer{blob: blob, cutAt: len(blob) / 2}
	srv := localServer(t, cs)
	cache := t.TempDir()
	var events []string
	var mu sync.Mutex
	p, err := fetchTo(context.Background(), File{URL: srv.URL + "/b", SHA256: sum(blob), Size: int64(len(blob))}, cache, func(ev progress.Event) {
		mu.Lock()
		events = append(events, ev.Phase+":"+ev.Message)
		mu.Unlock()
	})
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, blob) {
		t.Fatal("downloaded bundle differs from the served one")
	}
	want := []string{"", fmt.Sprintf("bytes=%d-", cs.cutAt)}
	if fmt.Sprint(cs.ranges) != fmt.Sprint(want) {
		t.Errorf("Range headers of the requests = %q, want %q (the second request must resume at the cut)", cs.ranges, want)
	}
	if _, err := os.Stat(filepath.Join(cache, sum(blob)+".bundle.partial")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a .partial is left after a verified download: %v", err)
	}
	if !strings.Contains(strings.Join(events, "\n"), "resuming at byte") {
		t.Errorf("no resume progress event in %q", events)
	}

	// A second Download finds the verified copy and asks nothing.
	if _, err := fetchTo(context.Background(), File{URL: srv.URL + "/b", SHA256: sum(blob), Size: int64(len(blob))}, cache, nil); err != nil {
		t.Fatal(err)
	}
	if len(cs.ranges) != 2 {
		t.Errorf("cached Fetch made %d requests in all, want 2", len(cs.ranges))
	}
}

func TestFetchResumesAPartialFromAnEarlierRun(t *testing.T) {
	blob := bytes.Repeat([]byte("xyz"), 100000)
	var ranges []string
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ranges = append(ranges, r.Header.Get("Range"))
		http.ServeContent(w, r, "bundle", time.Time{}, bytes.NewReader(blob))
	}))
	cache := t.TempDir()
	if err := os.WriteFile(filepath.Join(cache, sum(blob)+".bundle.partial"), blob[:1000], 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := fetchTo(context.Background(), File{URL: srv.URL, SHA256: sum(blob), Size: int64(len(blob))}, cache, nil); err != nil {
		t.Fatal(err)
	}
	if len(ranges) != 1 || ranges[0] != "bytes=1000-" {
		t.Errorf("Range headers = %q, want [bytes=1000-]", ranges)
	}
}

func TestFetchServerIgnoringRangeStartsOver(t *testing.T) {
	blob := bytes.Repeat([]byte("q"), 50000)
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write(blob) // 200, whole body, whatever the Range
	}))
	cache := t.TempDir()
	if err := os.WriteFile(filepath.Join(cache, sum(blob)+".bundle.partial"), []byte("garbage!"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := fetchTo(context.Background(), File{URL: srv.URL, SHA256: sum(blob), Size: int64(len(blob))}, cache, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, blob) {
		t.Error("a 200 answer to a Range request was appended to the partial instead of replacing it")
	}
}

func TestFetchChecksumMismatchKeepsNothing(t *testing.T) {
	blob := []byte("the real bundle")
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "bundle", time.Time{}, bytes.NewReader([]byte("a tampered one!")))
	}))
	cache := t.TempDir()
	_, err := fetchTo(context.Background(), File{URL: srv.URL, SHA256: sum(blob), Size: int64(len(blob))}, cache, nil)
	if !errors.Is(err, ErrChecksum) {
		t.Fatalf("Fetch of a file with the wrong content = %v, want ErrChecksum", err)
	}
	ents, _ := os.ReadDir(cache)
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".lock") {
			t.Errorf("left in the cache after a mismatch: %s", e.Name())
		}
	}
}

func TestFetchNotFoundIsNotRetried(t *testing.T) {
	n := 0
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		n++
		http.NotFound(w, nil)
	}))
	_, err := fetchTo(context.Background(), File{URL: srv.URL, SHA256: sum([]byte("x")), Size: 1}, t.TempDir(), nil)
	if err == nil || !strings.Contains(err.Error(), "404") || n != 1 {
		t.Errorf("Fetch from a 404 = %v after %d requests, want one request and a 404 error", err, n)
	}
}

func TestFetchModes(t *testing.T) {
	blob := []byte("kernel bytes")
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "k", time.Time{}, bytes.NewReader(blob))
	}))
	dir := t.TempDir()
	for _, mode := range []os.FileMode{0, 0o644} {
		final := filepath.Join(dir, fmt.Sprintf("f-%o", mode))
		if err := Fetch(context.Background(), File{URL: srv.URL, SHA256: sum(blob), Size: int64(len(blob))}, final, Options{Mode: mode}); err != nil {
			t.Fatal(err)
		}
		want := mode
		if want == 0 {
			want = 0o600
		}
		if st, err := os.Stat(final); err != nil || st.Mode().Perm() != want {
			t.Errorf("Fetch with Mode %o published %v (%v), want %o", mode, st.Mode(), err, want)
		}
	}
}

// TestFetchLockWaitHonoursCancellation: a second Fetch of a file another
// download holds waits for it, and gives up when its context ends.
func TestFetchLockWaitHonoursCancellation(t *testing.T) {
	dir := t.TempDir()
	final := filepath.Join(dir, "f")
	unlock, err := lockFile(context.Background(), final+".lock")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = Fetch(ctx, File{URL: "http://127.0.0.1:1/x", SHA256: sum([]byte("x")), Size: 1}, final, Options{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Fetch while another holds the lock = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("cancelled wait took %v", d)
	}
}

func TestFetchRefusesBadFiles(t *testing.T) {
	final := filepath.Join(t.TempDir(), "f")
	for _, f := range []File{
		{URL: "http://127.0.0.1:1/x", SHA256: "zz", Size: 1},
		{URL: "http://127.0.0.1:1/x", SHA256: sum([]byte("x")), Size: 0},
	} {
		if err := Fetch(context.Background(), f, final, Options{}); !errors.Is(err, ErrBadFile) {
			t.Errorf("Fetch(%+v) = %v, want ErrBadFile", f, err)
		}
	}
	if err := Fetch(context.Background(), File{URL: "ftp://x/y", SHA256: sum([]byte("x")), Size: 1}, final, Options{}); !errors.Is(err, ErrBadScheme) {
		t.Errorf("Fetch of an ftp URL = %v, want ErrBadScheme", err)
	}
}

func TestIndexAndResolve(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "index.json")
	if err := os.WriteFile(p, []byte(`{"x":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	data, base, err := Index(context.Background(), "file://"+p, 100)
	if err != nil || string(data) != `{"x":1}` || base.Path != p {
		t.Fatalf("Index = %q, %v, %v", data, base, err)
	}
	if _, _, err := Index(context.Background(), "file://"+p, 3); !errors.Is(err, ErrTooLarge) {
		t.Errorf("Index over the limit = %v, want ErrTooLarge", err)
	}
	httpBase, _ := url.Parse("http://127.0.0.1:8080/cat/index.json")
	for _, tc := range []struct {
		base *url.URL
		ref  string
		want string
		err  error
	}{
		{httpBase, "k/kernel", "http://127.0.0.1:8080/cat/k/kernel", nil},
		{httpBase, "https://mirror.invalid/k", "https://mirror.invalid/k", nil},
		{httpBase, "file:///etc/shadow", "", ErrBadScheme},
		{base, "k", "file://" + dir + "/k", nil},
		{base, "http://127.0.0.1/k", "", ErrBadScheme},
	} {
		got, err := Resolve(tc.base, tc.ref)
		if got != tc.want || !errors.Is(err, tc.err) {
			t.Errorf("Resolve(%s, %q) = %q, %v; want %q, %v", tc.base, tc.ref, got, err, tc.want, tc.err)
		}
	}
}
