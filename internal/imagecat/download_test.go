package imagecat

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
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/progress"
)

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

func TestDownloadResumesAfterCutOff(t *testing.T) {
	blob := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	cs := &cutServer{blob: blob, cutAt: len(blob) / 2}
	srv := localServer(t, cs)
	cache := t.TempDir()
	var events []string
	var mu sync.Mutex
	p, err := Download(context.Background(), File{URL: srv.URL + "/b", SHA256: sum(blob), Size: int64(len(blob))}, cache, func(ev progress.Event) {
		mu.Lock()
		events = append(events, ev.Phase+":"+ev.Message)
		mu.Unlock()
	})
	if err != nil {
		t.Fatalf("Download: %v", err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, blob) {
		t.Fatal("downloaded bundle differs from the served one")
	}
	want := []string{"", fmt.Sprintf("bytes=%d-", cs.cutAt)}
	if fmt.Sprint(cs.ranges) != fmt.Sprint(want) {
		t.Errorf("Range headers of the requests = %q, want %q (the second request must resume at the cut)", cs.ranges, want)
	}
	if _, err := os.Stat(filepath.Join(cache, sum(blob)+".partial")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a .partial is left after a verified download: %v", err)
	}
	if !strings.Contains(strings.Join(events, "\n"), "resuming at byte") {
		t.Errorf("no resume progress event in %q", events)
	}

	// A second Download finds the verified copy and asks nothing.
	if _, err := Download(context.Background(), File{URL: srv.URL + "/b", SHA256: sum(blob), Size: int64(len(blob))}, cache, nil); err != nil {
		t.Fatal(err)
	}
	if len(cs.ranges) != 2 {
		t.Errorf("cached download made %d requests in all, want 2", len(cs.ranges))
	}
}

func TestDownloadResumesAPartialFromAnEarlierRun(t *testing.T) {
	blob := bytes.Repeat([]byte("xyz"), 100000)
	var ranges []string
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ranges = append(ranges, r.Header.Get("Range"))
		http.ServeContent(w, r, "bundle", time.Time{}, bytes.NewReader(blob))
	}))
	cache := t.TempDir()
	if err := os.WriteFile(filepath.Join(cache, sum(blob)+".partial"), blob[:1000], 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Download(context.Background(), File{URL: srv.URL, SHA256: sum(blob), Size: int64(len(blob))}, cache, nil); err != nil {
		t.Fatal(err)
	}
	if len(ranges) != 1 || ranges[0] != "bytes=1000-" {
		t.Errorf("Range headers = %q, want [bytes=1000-]", ranges)
	}
}

func TestDownloadServerIgnoringRangeStartsOver(t *testing.T) {
	blob := bytes.Repeat([]byte("q"), 50000)
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write(blob) // 200, whole body, whatever the Range
	}))
	cache := t.TempDir()
	if err := os.WriteFile(filepath.Join(cache, sum(blob)+".partial"), []byte("garbage!"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := Download(context.Background(), File{URL: srv.URL, SHA256: sum(blob), Size: int64(len(blob))}, cache, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, blob) {
		t.Error("a 200 answer to a Range request was appended to the partial instead of replacing it")
	}
}

func TestDownloadChecksumMismatchKeepsNothing(t *testing.T) {
	blob := []byte("the real bundle")
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "bundle", time.Time{}, bytes.NewReader([]byte("a tampered one!")))
	}))
	cache := t.TempDir()
	_, err := Download(context.Background(), File{URL: srv.URL, SHA256: sum(blob), Size: int64(len(blob))}, cache, nil)
	if !errors.Is(err, ErrChecksum) {
		t.Fatalf("Download of a bundle with the wrong content = %v, want ErrChecksum", err)
	}
	ents, _ := os.ReadDir(cache)
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".lock") {
			t.Errorf("left in the cache after a mismatch: %s", e.Name())
		}
	}
}

func TestDownloadNotFoundIsNotRetried(t *testing.T) {
	n := 0
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		n++
		http.NotFound(w, nil)
	}))
	_, err := Download(context.Background(), File{URL: srv.URL, SHA256: sum([]byte("x")), Size: 1}, t.TempDir(), nil)
	if err == nil || !strings.Contains(err.Error(), "404") || n != 1 {
		t.Errorf("Download from a 404 = %v after %d requests, want one request and a 404 error", err, n)
	}
}

func TestFetchIndex(t *testing.T) {
	good := `{"schema":1,"entries":[{"name":"debian-bookworm","description":"Debian 12","os":{"id":"debian","version":"12"},
	  "kernel_ref":"generic-6.1","bundle":{"url":"debian-bookworm/abc.bundle","sha256":"` + strings.Repeat("a", 64) + `","size":10}}]}`
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	p := write("index.json", good)
	ix, err := Fetch(context.Background(), "file://"+p)
	if err != nil {
		t.Fatal(err)
	}
	e, ok := ix.Lookup("debian-bookworm")
	if !ok || e.Bundle.URL != "file://"+dir+"/debian-bookworm/abc.bundle" || e.OS.ID != "debian" || e.KernelRef != "generic-6.1" {
		t.Errorf("Fetch = %+v", ix)
	}

	srv := localServer(t, http.FileServer(http.Dir(dir)))
	ix, err = Fetch(context.Background(), srv.URL+"/index.json")
	if err != nil {
		t.Fatal(err)
	}
	if got := ix.Entries[0].Bundle.URL; got != srv.URL+"/debian-bookworm/abc.bundle" {
		t.Errorf("relative bundle URL resolved to %q", got)
	}

	bad := []struct{ name, doc, want string }{
		{"schema", strings.Replace(good, `"schema":1`, `"schema":2`, 1), "schema 2"},
		{"bad name", strings.Replace(good, `"debian-bookworm","desc`, `"../x","desc`, 1), "invalid image catalog index"},
		{"bad sha", strings.Replace(good, strings.Repeat("a", 64), "zz", 1), "sha256"},
		{"scheme escape", strings.Replace(good, `debian-bookworm/abc.bundle`, `file:///etc/shadow`, 1), "scheme"},
		{"control bytes", strings.Replace(good, `Debian 12`, `Debian\u001b[2J`, 1), "control"},
		{"duplicate", strings.Replace(good, `}]}`, `},{"name":"debian-bookworm","os":{"id":"debian"},"bundle":{"url":"x","sha256":"`+strings.Repeat("b", 64)+`","size":1}}]}`, 1), "twice"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			write("bad.json", tc.doc)
			_, err := Fetch(context.Background(), srv.URL+"/bad.json")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Fetch = %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}
