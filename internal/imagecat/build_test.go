package imagecat

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/testutil"
)

// debugfsStat runs debugfs's stat on a path of the image and returns its
// output.
func debugfsStat(t *testing.T, img, path string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", "stat "+path, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs stat %s: %v: %s", path, err, out)
	}
	return string(out)
}

func fakeAgent(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "banger-vsock-agent")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n# stand-in agent\n"), 0o755); err != nil { // #nosec G306 -- an executable
		t.Fatal(err)
	}
	return p
}

// TestBuildPullUnpack builds a catalog dir from a small root filesystem
// tar, fetches it back through file://, downloads and unpacks the bundle,
// and checks the ext4 with e2fsck and debugfs: ownership from the tar,
// injected agents, sparseness.
func TestBuildPullUnpack(t *testing.T) {
	testutil.RequiresTool(t, "mkfs.ext4", "debugfs", "e2fsck")
	ctx := context.Background()
	work := t.TempDir()
	out := filepath.Join(work, "catalog")
	e, err := BuildFromTar(ctx, BuildOptions{
		RootfsTar: testutil.MiniRootfsTar(t, work, "one"), Name: "debian-bookworm", Description: "Debian 12 (test)",
		KernelRef: "generic-6.1", AgentBinary: fakeAgent(t, work), OutDir: out, Builder: "test", Level: zstd.SpeedFastest,
	})
	if err != nil {
		t.Fatalf("BuildFromTar: %v", err)
	}
	if e.OS != (OS{ID: "debian", Version: "12"}) || !strings.HasPrefix(e.Bundle.URL, "debian-bookworm/") {
		t.Errorf("entry = %+v", e)
	}

	ix, err := Fetch(ctx, "file://"+filepath.Join(out, IndexFile))
	if err != nil {
		t.Fatal(err)
	}
	got, ok := ix.Lookup("debian-bookworm")
	if !ok || got.KernelRef != "generic-6.1" || got.Bundle.SHA256 != e.Bundle.SHA256 {
		t.Fatalf("index after build = %+v", ix)
	}
	bundle, err := Download(ctx, got.Bundle, filepath.Join(work, "cache"), nil)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(work, "staging")
	if err := os.Mkdir(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	res, err := UnpackFile(ctx, bundle, dst, nil)
	if err != nil {
		t.Fatalf("Unpack: %v", err)
	}
	if err := CheckMetadata(res.Metadata, got); err != nil {
		t.Error(err)
	}
	if out, err := exec.Command("e2fsck", "-fn", res.RootFS).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn on the unpacked rootfs: %v\n%s", err, out)
	}
	for path, want := range map[string]string{
		"/home/dev/.profile":     "User:  1000   Group:  1000",
		"/usr/bin/sudo":          "Mode:  04755",
		imagepull.GuestAgentPath: "Mode:  0755",
		"/etc/systemd/system/multi-user.target.wants/banger-vsock-agent.service": "Type: symlink",
	} {
		if s := debugfsStat(t, res.RootFS, path); !strings.Contains(s, want) {
			t.Errorf("%s in the unpacked rootfs: want %q in\n%s", path, want, s)
		}
	}
	if s := debugfsStat(t, res.RootFS, "/etc/ssh/ssh_host_ed25519_key"); !strings.Contains(s, "File not found") {
		t.Errorf("the baked-in host key is still in the image:\n%s", s)
	}
	if s := debugfsStat(t, res.RootFS, "/etc/systemd/system/ssh.service.wants/"+HostKeysUnit); !strings.Contains(s, "Type: symlink") {
		t.Errorf("host key unit not enabled:\n%s", s)
	}
	st, _ := os.Stat(res.RootFS)
	if a := allocated(t, res.RootFS); a > st.Size()/4 {
		t.Errorf("unpacked rootfs allocates %d of %d bytes: not sparse", a, st.Size())
	}

	// Rebuilding replaces the entry and removes the old bundle.
	e2, err := BuildFromTar(ctx, BuildOptions{
		RootfsTar: testutil.MiniRootfsTar(t, t.TempDir(), "two"), Name: "debian-bookworm", Description: "Debian 12 (test)",
		KernelRef: "generic-6.1", AgentBinary: fakeAgent(t, work), OutDir: out, Level: zstd.SpeedFastest,
	})
	if err != nil {
		t.Fatal(err)
	}
	if e2.Bundle.SHA256 == e.Bundle.SHA256 {
		t.Fatal("a different tree gave the same bundle")
	}
	ix, _ = Fetch(ctx, "file://"+filepath.Join(out, IndexFile))
	if len(ix.Entries) != 1 || ix.Entries[0].Bundle.SHA256 != e2.Bundle.SHA256 {
		t.Errorf("index after rebuild = %+v", ix)
	}
	if _, err := os.Stat(filepath.Join(out, e.Bundle.URL)); !os.IsNotExist(err) {
		t.Errorf("old bundle %s still there: %v", e.Bundle.URL, err)
	}
}

func TestReadOSReleaseRefusesSymlinkOnly(t *testing.T) {
	tree := t.TempDir()
	if err := os.MkdirAll(filepath.Join(tree, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc/os-release", filepath.Join(tree, "etc/os-release")); err != nil {
		t.Fatal(err)
	}
	if _, err := readOSRelease(tree); err == nil {
		t.Fatal("readOSRelease followed a symlink out of the tree")
	}
}
