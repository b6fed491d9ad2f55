package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

// TestE2ECatalogImageBoots pulls debian-bookworm from an image catalog
// (bundle built by the maintainer tooling, served inside the namespace),
// boots it under QEMU and runs a command over banger ssh, with no
// first-boot install: openssh-server is already in the bundle.
func TestE2ECatalogImageBoots(t *testing.T) {
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "ssh", "mkfs.ext4", "debugfs", "busybox")
	deb := testutil.DebianKernelDeb(t)
	rootTar := testutil.DebianRootfsTar(t, "", nil)
	bins := binaries(t)
	catalog := catalogDir(t, rootTar, filepath.Join(bins, "banger-vsock-agent"))

	ns := newNetNS(t)
	srv := ns.cmd("busybox", "httpd", "-f", "-p", "127.0.0.1:8081", "-h", catalog)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Process.Kill(); _ = srv.Wait() })
	d := newDaemon(t, ns, map[string]any{"image_catalog": "http://127.0.0.1:8081/index.json"})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	d.MustCLI(ctx, "kernel", "import", "deb-cloud", "--deb", deb)
	out := d.MustCLI(ctx, "image", "catalog")
	if !strings.Contains(out, "debian-bookworm") {
		t.Fatalf("image catalog does not list debian-bookworm:\n%s", out)
	}
	start := time.Now()
	d.MustCLI(ctx, "image", "pull", "debian-bookworm")
	t.Logf("catalog pull to a published image: %s", time.Since(start).Round(100*time.Millisecond))
	var img model.Image
	d.JSON(ctx, &img, "image", "inspect", "debian-bookworm")
	if img.Source != "catalog" || img.Kernel != "deb-cloud" {
		t.Fatalf("catalog image record: source %q kernel %q", img.Source, img.Kernel)
	}

	d.MustCLI(ctx, "vm", "run", "--image", "debian-bookworm", "--name", "cat", "--memory", "1G")
	d.MustCLI(ctx, "ssh", "cat", "--", "true")
	// No first-boot install: sshd was in the bundle.
	log := d.MustCLI(ctx, "ssh", "cat", "--", "cat", "/var/log/banger-first-boot.log")
	if !strings.Contains(log, "skipping the install") || strings.Contains(log, "apt-get") {
		t.Fatalf("first boot of a catalog image installed something:\n%s", log)
	}
	d.MustCLI(ctx, "vm", "rm", "--force", "cat")
}

// catalogDir builds (once, cached) an image catalog holding debian-bookworm
// from the Debian test root filesystem, with the maintainer tooling's
// builder, pointing at the kernel "deb-cloud".
func catalogDir(t *testing.T, rootTar, agent string) string {
	t.Helper()
	dir := filepath.Join(testutil.CacheDir(), "image-catalog")
	index := filepath.Join(dir, imagecat.IndexFile)
	if fi, err := os.Stat(index); err == nil {
		if tfi, err := os.Stat(rootTar); err == nil && !tfi.ModTime().After(fi.ModTime()) {
			return dir
		}
	}
	_ = os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if _, err := imagecat.BuildFromTar(ctx, imagecat.BuildOptions{
		RootfsTar: rootTar, Name: "debian-bookworm", Description: "Debian 12 test image",
		KernelRef: "deb-cloud", AgentBinary: agent, OutDir: dir, Builder: "banger e2e",
	}); err != nil {
		_ = os.RemoveAll(dir)
		t.Fatalf("build the image catalog: %v", err)
	}
	return dir
}
