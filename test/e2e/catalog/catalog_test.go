// Package catalog holds the end-to-end test of an image catalog: a bundle
// built by the maintainer tooling, served inside the test's namespace,
// pulled and booted.
package catalog

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// TestE2ECatalogImageBoots pulls debian-bookworm from an image catalog
// (bundle built by the maintainer tooling, served inside the namespace),
// boots it under QEMU and runs a command over banger ssh, with no
// first-boot install: openssh-server is already in the bundle.
func TestE2ECatalogImageBoots(t *testing.T) {
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "ssh", "mkfs.ext4", "debugfs", "busybox")
	deb := testutil.DebianKernelDeb(t)
	rootTar := testutil.DebianRootfsTar(t, "", nil)
	bins := e2etest.Binaries(t)
	catalog := catalogDir(t, rootTar, filepath.Join(bins, "banger-vsock-agent"))

	ns := e2etest.NewNetNS(t)
	ns.Serve(t, "busybox", "httpd", "-f", "-p", "127.0.0.1:8081", "-h", catalog)
	d := e2etest.NewDaemon(t, ns, map[string]any{"image_catalog": "http://127.0.0.1:8081/index.json"})
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
	return testutil.CachedDir(t, "image-catalog", []string{rootTar}, func(dir string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		if _, err := imagecat.BuildFromTar(ctx, imagecat.BuildOptions{
			RootfsTar: rootTar, Name: "debian-bookworm", Description: "Debian 12 test image",
			KernelRef: "deb-cloud", AgentBinary: agent, OutDir: dir, Builder: "banger e2e",
		}); err != nil {
			return fmt.Errorf("build the image catalog: %w", err)
		}
		return nil
	})
}
