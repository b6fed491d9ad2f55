// Package firstboot holds the end-to-end test of banger's first-boot
// install: an image without sshd gets it from a Debian repository served
// inside the test's namespace.
package firstboot

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/test/e2e/e2etest"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// TestE2EFirstBoot boots an image without openssh-server whose apt sources
// point at a Debian package repository served inside the namespace: the
// first boot installs sshd, banger ssh works, and the next boot skips the
// install.
func TestE2EFirstBoot(t *testing.T) {
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "apt-get", "apt-cache", "dpkg-scanpackages", "busybox")
	var pkgs []string
	for _, p := range testutil.DebianPackages {
		if p != "openssh-server" {
			pkgs = append(pkgs, p)
		}
	}
	repo := debianRepo(t, "openssh-server")
	base := e2etest.DebianLayout(t, "nossh", pkgs)
	e := e2etest.SetupWith(t, nil, "debian-img", func(ns *e2etest.NetNS, reg *e2etest.Registry) string {
		layoutDir := withAptSources(t, base, "deb [trusted=yes] http://172.30.0.1:8080/ ./\n")
		return reg.Push(t, ns, layoutDir, "banger/debian-nossh")
	})
	d := e.D
	// The repository listens on the bridge address, which exists once the
	// daemon has made the bridge: create a VM first, then serve.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "fb", "--memory", "1G")
	e.NS.Serve(t, "busybox", "httpd", "-f", "-p", "0.0.0.0:8080", "-h", repo)

	t.Cleanup(func() {
		if t.Failed() {
			logFirstBootLog(t, d)
		}
	})
	start := time.Now()
	d.MustCLI(ctx, "vm", "start", "fb", "--wait")
	t.Logf("first boot with sshd install: %s", time.Since(start).Round(time.Second))
	var vm model.VM
	d.JSON(ctx, &vm, "vm", "inspect", "fb")
	if vm.FirstBoot != "done" {
		t.Fatalf("first boot is %q (%v), want done", vm.FirstBoot, vm.FirstBootLog)
	}
	d.MustCLI(ctx, "ssh", "fb", "--", "test", "!", "-e", "/var/lib/banger/first-boot-pending")
	out := d.MustCLI(ctx, "ssh", "fb", "--", "dpkg-query", "-W", "-f", "'${Status}'", "openssh-server")
	if !strings.Contains(out, "install ok installed") {
		t.Fatalf("openssh-server not installed in the guest: %q", out)
	}
	d.MustCLI(ctx, "vm", "stop", "fb")
	d.MustCLI(ctx, "vm", "start", "fb", "--wait")
	// The first-boot service ran once: its log holds one run, and the
	// marker-conditioned unit was skipped on the second boot.
	out = d.MustCLI(ctx, "ssh", "fb", "--", "grep", "-c", "'package manager'", "/var/log/banger-first-boot.log")
	if strings.TrimSpace(out) != "1" {
		t.Errorf("first-boot install ran %s times over two boots, want 1", strings.TrimSpace(out))
	}
	out = d.MustCLI(ctx, "ssh", "fb", "--", "systemctl", "show", "-p", "ConditionResult", "banger-first-boot.service")
	if !strings.Contains(out, "ConditionResult=no") {
		t.Errorf("banger-first-boot.service was not skipped on the second boot: %s", out)
	}
	d.MustCLI(ctx, "ssh", "fb", "--", "true")
	d.MustCLI(ctx, "vm", "rm", "--force", "fb")
	e2etest.AssertNoVMResources(t, e, true)
}

// logFirstBootLog logs the guest's first-boot log, read from each VM disk
// left in the state dir, so that a first boot that did not finish says why.
func logFirstBootLog(t *testing.T, d *e2etest.Daemon) {
	disks, _ := filepath.Glob(filepath.Join(d.StateDir(), "vms", "*", "disk.ext4*"))
	for _, disk := range disks {
		out, err := e2etest.CombinedOutput(exec.Command("debugfs", "-c", "-R", "cat /var/log/banger-first-boot.log", disk))
		t.Logf("first-boot log in %s (%v):\n%s", disk, err, e2etest.Tail(string(out), 60))
	}
}

// withAptSources returns a copy of the OCI layout at base with one more
// layer that replaces the image's apt sources with sources.
func withAptSources(t *testing.T, base, sources string) string {
	t.Helper()
	p, err := layout.FromPath(base)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	files := []struct {
		name, body string
		mode       int64
	}{
		{"etc/apt/sources.list", sources, 0o644},
		{"etc/apt/sources.list.d/.wh.debian.sources", "", 0o644},
	}
	for _, f := range files {
		_ = tw.WriteHeader(&tar.Header{Name: f.name, Mode: f.mode, Size: int64(len(f.body)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)})
		_, _ = tw.Write([]byte(f.body))
	}
	_ = tw.Close()
	raw := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil }, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.AppendLayers(img, layer)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "layout")
	if err := e2etest.WriteLayout(dir, img); err != nil {
		t.Fatal(err)
	}
	return dir
}

// debianRepo returns a flat Debian repository (cached) holding pkg and its
// dependencies, with a Packages index.
func debianRepo(t *testing.T, pkg string) string {
	t.Helper()
	return testutil.CachedDir(t, "repo-"+pkg, nil, func(dir string) error {
		out, err := exec.Command("apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
			"--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends", pkg).Output()
		if err != nil {
			return fmt.Errorf("apt-cache depends %s: %w", pkg, err)
		}
		set := map[string]bool{}
		for _, line := range strings.Split(string(out), "\n") {
			if line != "" && !strings.HasPrefix(line, " ") && !strings.HasPrefix(line, "<") {
				set[strings.TrimSpace(line)] = true
			}
		}
		var names []string
		for n := range set {
			names = append(names, n)
		}
		sort.Strings(names)
		cmd := exec.Command("apt-get", append([]string{"download"}, names...)...)
		cmd.Dir = dir
		if out, err := e2etest.CombinedOutput(cmd); err != nil {
			return fmt.Errorf("apt-get download: %w\n%s", err, e2etest.Tail(string(out), 20))
		}
		scan := exec.Command("dpkg-scanpackages", "--multiversion", ".")
		scan.Dir = dir
		idx, err := e2etest.Output(scan)
		if err != nil {
			return fmt.Errorf("dpkg-scanpackages: %w", err)
		}
		t.Logf("Debian repo for %s: %d packages", pkg, len(names))
		return os.WriteFile(filepath.Join(dir, "Packages"), idx, 0o644)
	})
}
