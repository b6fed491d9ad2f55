package imagecat

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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

// TestDownloadNamesTheBundle: Download is download.Fetch into
// <cache>/<sha256>.bundle (the download package's own tests cover resume
// and verification).
func TestDownloadNamesTheBundle(t *testing.T) {
	blob := []byte("a bundle")
	srv := localServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "bundle", time.Time{}, bytes.NewReader(blob))
	}))
	cache := filepath.Join(t.TempDir(), "catalog")
	p, err := Download(context.Background(), File{URL: srv.URL, SHA256: sum(blob), Size: int64(len(blob))}, cache, nil)
	if err != nil {
		t.Fatal(err)
	}
	if p != filepath.Join(cache, sum(blob)+".bundle") {
		t.Errorf("Download = %s", p)
	}
	if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("bundle mode = %v (%v), want 0600", st.Mode(), err)
	}
	_, err = Download(context.Background(), File{URL: srv.URL, SHA256: sum([]byte("other")), Size: int64(len(blob))}, cache, nil)
	if !errors.Is(err, ErrChecksum) {
		t.Errorf("Download of the wrong content = %v, want ErrChecksum", err)
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
