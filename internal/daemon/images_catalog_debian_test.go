package daemon_test

import (
	"compress/gzip"
	"context"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

// debianCatalog builds the real debian-bookworm bundle from the cached
// mmdebstrap root filesystem (root + mmdebstrap tier), with the real
// static guest agent, serves it on 127.0.0.1 and returns the daemon config
// mutation that uses it, and the rootfs tar.
func debianCatalog(tb testing.TB) (func(*config.Config), string) {
	tb.Helper()
	testutil.RequiresTool(tb, "mkfs.ext4", "debugfs", "e2fsck", "go")
	rootTar := testutil.DebianRootfsTar(tb, "", nil)
	work := tb.TempDir()
	agent := filepath.Join(work, "banger-vsock-agent")
	build := exec.Command("go", "build", "-trimpath", "-o", agent, "github.com/bangerdev/banger/cmd/banger-vsock-agent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		tb.Fatalf("go build banger-vsock-agent: %v\n%s", err, out)
	}
	dir := filepath.Join(work, "catalog")
	start := time.Now()
	e, err := imagecat.BuildFromTar(context.Background(), imagecat.BuildOptions{
		RootfsTar: rootTar, Name: "debian-bookworm", Description: "Debian 12 (bookworm)", AgentBinary: agent, OutDir: dir,
	})
	if err != nil {
		tb.Fatalf("BuildFromTar(debian): %v", err)
	}
	tb.Logf("built the debian-bookworm bundle (%d bytes) in %s", e.Bundle.Size, time.Since(start).Round(time.Second))
	srv := httptest.NewServer(&catalogServer{dir: dir, cutAt: map[string]int{}})
	tb.Cleanup(srv.Close)
	return func(c *config.Config) {
		c.ImageCatalog = srv.URL + "/index.json"
		c.AgentBinary = agent
	}, rootTar
}

// TestCatalogPullDebianBookworm pulls the real Debian bundle: the image
// holds sshd and the agent, and no baked-in SSH host key.
func TestCatalogPullDebianBookworm(t *testing.T) {
	testutil.RequiresRoot(t)
	mut, _ := debianCatalog(t)
	s := daemontest.Start(t, mut)
	f := &catalogFixture{s: s, client: api.NewClient(s.Config.Socket)}
	img, _, err := f.pull(t, api.PullRequest{Ref: "debian-bookworm"})
	if err != nil {
		t.Fatalf("pull debian-bookworm: %v", err)
	}
	if out, err := exec.Command("e2fsck", "-fn", img.RootFS).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
	for path, want := range map[string]string{
		"/usr/sbin/sshd":            "Type: regular",
		"/usr/bin/sudo":             "Mode:  04755",
		imagepull.GuestAgentPath:    "Type: regular",
		"/etc/ssh/ssh_host_rsa_key": "File not found",
		"/etc/systemd/system/ssh.service.wants/" + imagecat.HostKeysUnit: "Type: symlink",
	} {
		out, _ := exec.Command("debugfs", "-R", "stat "+path, img.RootFS).CombinedOutput()
		if !strings.Contains(string(out), want) {
			t.Errorf("%s: want %q in debugfs stat:\n%s", path, want, out)
		}
	}
}

// BenchmarkCatalogVsOCIPull measures the time to a published image, over
// the daemon's socket, of the catalog pull of the debian-bookworm bundle
// and of the OCI pull of the same root filesystem as a single-layer image
// from an in-process registry, both on 127.0.0.1, caches emptied before
// each pull.
//
//	sudo go test -run '^$' -bench CatalogVsOCIPull -benchtime 1x ./internal/daemon/
func BenchmarkCatalogVsOCIPull(b *testing.B) {
	testutil.RequiresRoot(b)
	mut, rootTar := debianCatalog(b)
	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	b.Cleanup(reg.Close)
	layer, err := tarball.LayerFromFile(rootTar, tarball.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		b.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		b.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		b.Fatal(err)
	}
	cf.OS, cf.Architecture = "linux", "amd64"
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		b.Fatal(err)
	}
	ref := strings.TrimPrefix(reg.URL, "http://") + "/bench/debian:bookworm"
	tag, err := name.ParseReference(ref)
	if err != nil {
		b.Fatal(err)
	}
	if err := remote.Write(tag, img); err != nil {
		b.Fatalf("push %s: %v", ref, err)
	}
	s := daemontest.Start(b, mut)
	f := &catalogFixture{s: s, client: api.NewClient(s.Config.Socket)}
	pull := func(req api.PullRequest) (model.Image, time.Duration) {
		if err := os.RemoveAll(s.Config.CacheDir); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		var got model.Image
		if err := f.client.Stream(ctx, "POST", "/images/pull", req, nil, &got); err != nil {
			b.Fatalf("pull %s: %v", req.Ref, err)
		}
		return got, time.Since(start)
	}
	var cat, oci time.Duration
	b.ResetTimer()
	for range b.N {
		ci, c := pull(api.PullRequest{Ref: "debian-bookworm", Name: "cat", Force: true})
		oi, o := pull(api.PullRequest{Ref: ref, Name: "oci", Force: true})
		cat, oci = cat+c, oci+o
		b.Logf("catalog %s (rootfs %d bytes), oci %s (rootfs %d bytes): %.1fx", c.Round(time.Millisecond), ci.Size, o.Round(time.Millisecond), oi.Size, o.Seconds()/c.Seconds())
	}
	b.StopTimer()
	b.ReportMetric(cat.Seconds()/float64(b.N), "catalog-s/op")
	b.ReportMetric(oci.Seconds()/float64(b.N), "oci-s/op")
	b.ReportMetric(oci.Seconds()/cat.Seconds(), "speedup")
}
