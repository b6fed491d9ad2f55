package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// TestE2ETwoVMs runs two VMs at once: different IPs, and they reach each
// other over the bridge.
func TestE2ETwoVMs(t *testing.T) {
	e := setup(t, nil)
	d := e.d
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "vm", "create", "--image", e.imgName, "--name", "a", "--memory", "768M")
	d.MustCLI(ctx, "vm", "create", "--image", e.imgName, "--name", "b", "--memory", "768M")
	// Start both, then wait for both: the boots overlap.
	d.MustCLI(ctx, "vm", "start", "a")
	d.MustCLI(ctx, "vm", "start", "b")
	var a, b model.VM
	for _, n := range []string{"a", "b"} {
		d.MustCLI(ctx, "ssh", n, "--", "true")
	}
	d.JSON(ctx, &a, "vm", "inspect", "a")
	d.JSON(ctx, &b, "vm", "inspect", "b")
	if a.IP == "" || a.IP == b.IP {
		t.Fatalf("VM IPs %q and %q must differ", a.IP, b.IP)
	}
	d.MustCLI(ctx, "ssh", "a", "--", "ping", "-c", "2", "-W", "5", b.IP)
	d.MustCLI(ctx, "ssh", "b", "--", "ping", "-c", "2", "-W", "5", a.IP)
	var list []model.VMSummary
	d.JSON(ctx, &list, "vm", "ls")
	if len(list) != 2 || list[0].State != model.VMRunning || list[1].State != model.VMRunning {
		t.Fatalf("vm ls: %+v", list)
	}
	d.MustCLI(ctx, "vm", "rm", "--force", "a", "b")
	assertNoVMResources(t, e, true)
}

// TestE2EFailures: a kernel that cannot boot sends the VM to error, releases
// everything and keeps the console log; a VM monitor killed from outside is
// noticed and its VM stopped with its resources released.
func TestE2EFailures(t *testing.T) {
	e := setup(t, map[string]any{"healthy_timeout": "3m"})
	d := e.d
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	// The cloud kernel without its initramfs has no virtio_blk: it panics
	// looking for the root device (panic=-1 + -no-reboot: QEMU exits).
	d.MustCLI(ctx, "kernel", "import", "no-initrd", "--kernel", e.kernel.Kernel.Path)
	d.MustCLI(ctx, "vm", "create", "--image", e.imgName, "--name", "bad", "--kernel-ref", "no-initrd")
	r := d.CLI(ctx, "vm", "start", "bad", "--wait")
	if r.Code == 0 {
		t.Fatalf("vm start of an unbootable kernel succeeded:\n%s", r.Stdout)
	}
	var vm model.VM
	d.JSON(ctx, &vm, "vm", "inspect", "bad")
	if vm.State != model.VMError || vm.Reason == "" || !vm.Runtime.Empty() {
		t.Fatalf("unbootable VM: state %s reason %q runtime %+v", vm.State, vm.Reason, vm.Runtime)
	}
	logs := d.MustCLI(ctx, "vm", "logs", "bad")
	if !strings.Contains(logs, "Kernel panic") && !strings.Contains(logs, "VFS") {
		t.Errorf("console log of the failed boot was not kept:\n%s", tail(logs, 20))
	}
	assertNoVMResources(t, e, false)
	d.MustCLI(ctx, "vm", "rm", "bad")

	// A monitor killed from outside.
	d.MustCLI(ctx, "vm", "run", "--image", e.imgName, "--name", "victim", "--memory", "768M")
	vm = model.VM{}
	d.JSON(ctx, &vm, "vm", "inspect", "victim")
	if vm.Runtime.PID == 0 {
		t.Fatal("running VM has no pid")
	}
	if err := syscall.Kill(vm.Runtime.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		vm = model.VM{}
		d.JSON(ctx, &vm, "vm", "inspect", "victim")
		if vm.State == model.VMStopped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM whose monitor was killed is still %s after 30s", vm.State)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if !vm.Runtime.Empty() || len(vm.Recovery.Removed) == 0 {
		t.Fatalf("killed VM: runtime %+v, cleanup removed %v", vm.Runtime, vm.Recovery.Removed)
	}
	assertNoVMResources(t, e, false)
	// It starts again.
	d.MustCLI(ctx, "vm", "start", "victim", "--wait")
	d.MustCLI(ctx, "vm", "rm", "--force", "victim")
	assertNoVMResources(t, e, true)
}

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
	base := debianLayout(t, "nossh", pkgs)
	e := setupWithImage(t, func(ns *NetNS, reg *Registry) string {
		layoutDir := withAptSources(t, base, "deb [trusted=yes] http://172.30.0.1:8080/ ./\n")
		return reg.push(t, ns, layoutDir, "banger/debian-nossh")
	})
	d := e.d
	// The repository listens on the bridge address, which exists once the
	// daemon has made the bridge: create a VM first, then serve.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "vm", "create", "--image", e.imgName, "--name", "fb", "--memory", "1G")
	srv := e.ns.cmd("busybox", "httpd", "-f", "-p", "0.0.0.0:8080", "-h", repo)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Process.Kill(); _ = srv.Wait() })

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
	assertNoVMResources(t, e, true)
}

// setupWithImage is setup with a caller-made image reference.
func setupWithImage(t *testing.T, push func(ns *NetNS, reg *Registry) string) *env {
	t.Helper()
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "ssh", "mkfs.ext4", "debugfs")
	deb := testutil.DebianKernelDeb(t)
	ns := newNetNS(t)
	reg := startRegistry(t, ns)
	ref := push(ns, reg)
	d := newDaemon(t, ns, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "kernel", "import", "deb-cloud", "--deb", deb)
	var k model.Kernel
	d.JSON(ctx, &k, "kernel", "inspect", "deb-cloud")
	d.MustCLI(ctx, "image", "pull", ref, "--name", "debian-img", "--kernel-ref", "deb-cloud")
	return &env{ns: ns, reg: reg, d: d, kernel: k, imgName: "debian-img"}
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
	// Reuse the base layer blob by hardlink to avoid copying 100+ MB.
	np, err := layout.Write(dir, emptyIndex())
	if err != nil {
		t.Fatal(err)
	}
	if err := np.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "test"})); err != nil {
		t.Fatal(err)
	}
	return dir
}

// debianRepo returns a flat Debian repository (cached) holding pkg and its
// dependencies, with a Packages index.
func debianRepo(t *testing.T, pkg string) string {
	t.Helper()
	dir := filepath.Join(testutil.CacheDir(), "repo-"+pkg)
	if _, err := os.Stat(filepath.Join(dir, "Packages")); err == nil {
		return dir
	}
	tmp := dir + ".tmp"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
		"--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends", pkg).Output()
	if err != nil {
		t.Fatalf("apt-cache depends %s: %v", pkg, err)
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
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("apt-get download: %v\n%s", err, tail(string(out), 20))
	}
	scan := exec.Command("dpkg-scanpackages", "--multiversion", ".")
	scan.Dir = tmp
	idx, err := scan.Output()
	if err != nil {
		t.Fatalf("dpkg-scanpackages: %v", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "Packages"), idx, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		t.Fatal(err)
	}
	t.Logf("Debian repo for %s: %d packages", pkg, len(names))
	return dir
}
