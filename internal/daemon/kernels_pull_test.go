package daemon_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

var (
	kcatOnce sync.Once
	kcatDir  string
	kcatErr  error
)

// kernelCatalogDir builds, once per test binary, a kernel catalog holding
// "generic-6.1" from the Debian cloud kernel with scripts/kernelcat-build.
func kernelCatalogDir(t *testing.T) string {
	t.Helper()
	deb := testutil.DebianKernelDeb(t)
	testutil.RequiresTool(t, "go", "depmod", "sh")
	kcatOnce.Do(func() {
		kcatDir, kcatErr = os.MkdirTemp("", "banger-kcat-")
		if kcatErr != nil {
			return
		}
		script, _ := filepath.Abs("../../scripts/kernelcat-build")
		if out, err := exec.Command(script, deb, "generic-6.1", kcatDir).CombinedOutput(); err != nil {
			kcatErr = errors.New(err.Error() + ": " + string(out))
		}
	})
	if kcatErr != nil {
		t.Fatalf("scripts/kernelcat-build: %v", kcatErr)
	}
	return kcatDir
}

// TestKernelPullThroughDaemon pulls a kernel from a catalog served on
// 127.0.0.1 through the daemon's API: a good pull is recorded; a corrupt
// artifact publishes and records nothing; an unknown name lists the
// catalog.
func TestKernelPullThroughDaemon(t *testing.T) {
	dir := kernelCatalogDir(t)
	var corrupt bool
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		data, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(strings.TrimPrefix(r.URL.Path, "/"))))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		mu.Lock()
		bad := corrupt
		mu.Unlock()
		if bad && strings.HasSuffix(r.URL.Path, "/kernel") {
			data = append([]byte(nil), data...)
			data[len(data)/2] ^= 0xff
		}
		http.ServeContent(w, r, "", time.Unix(0, 0), strings.NewReader(string(data)))
	}))
	defer srv.Close()
	s := daemontest.Start(t, func(c *config.Config) { c.KernelCatalog = srv.URL + "/index.json" })
	c := api.NewClient(s.Config.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// Corrupt first: nothing may be published or recorded.
	mu.Lock()
	corrupt = true
	mu.Unlock()
	var k model.Kernel
	err := c.Stream(ctx, "POST", "/kernels/pull", api.KernelPullRequest{Name: "generic-6.1"}, nil, &k)
	if err == nil || !strings.Contains(err.Error(), "sha256") {
		t.Fatalf("pull of a corrupt kernel: err %v, want a sha256 mismatch", err)
	}
	if _, err := s.D.Store().GetKernel("generic-6.1"); err == nil {
		t.Fatal("a corrupt pull was recorded")
	}
	if ents, _ := os.ReadDir(s.Config.KernelsDir()); len(ents) != 0 {
		t.Fatalf("a corrupt pull left %v in the kernels dir", ents)
	}

	mu.Lock()
	corrupt = false
	mu.Unlock()
	var events []string
	err = c.Stream(ctx, "POST", "/kernels/pull", api.KernelPullRequest{Name: "generic-6.1"}, func(ev progressEvent) { events = append(events, ev.Phase) }, &k)
	if err != nil {
		t.Fatalf("pull: %v", err)
	}
	if k.Name != "generic-6.1" || k.Source != "catalog" || k.Initrd == nil || k.Modules == nil {
		t.Fatalf("pulled kernel record: %+v", k)
	}
	if _, err := os.Stat(k.Kernel.Path); err != nil {
		t.Fatalf("kernel artifact: %v", err)
	}
	if len(events) == 0 {
		t.Error("the pull reported no progress")
	}
	if err := c.Stream(ctx, "POST", "/kernels/pull", api.KernelPullRequest{Name: "generic-6.1"}, nil, nil); api.CodeOf(err) != api.CodeConflict {
		t.Fatalf("second pull without --force: %v, want a conflict", err)
	}
	if err := c.Stream(ctx, "POST", "/kernels/pull", api.KernelPullRequest{Name: "generic-6.1", Force: true}, nil, &k); err != nil {
		t.Fatalf("pull --force: %v", err)
	}
	err = c.Stream(ctx, "POST", "/kernels/pull", api.KernelPullRequest{Name: "nope"}, nil, nil)
	if api.CodeOf(err) != api.CodeNotFound || !strings.Contains(err.Error(), "generic-6.1") {
		t.Fatalf("unknown kernel: %v, want not found listing generic-6.1", err)
	}
}
