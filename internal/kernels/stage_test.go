package kernels_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

func TestStageBootArtifacts(t *testing.T) {
	k := debianKernel(t)
	img := filepath.Join(t.TempDir(), "img")
	if err := os.Mkdir(img, 0o755); err != nil {
		t.Fatal(err)
	}
	ba, err := kernels.StageBootArtifacts(context.Background(), k, img)
	if err != nil {
		t.Fatalf("StageBootArtifacts: %v", err)
	}
	want := model.BootArtifacts{Kernel: filepath.Join(img, "kernel"), Initrd: filepath.Join(img, "initrd"), Modules: filepath.Join(img, "modules", k.Version), Version: k.Version}
	if ba != want {
		t.Fatalf("StageBootArtifacts = %+v, want %+v", ba, want)
	}
	// Same file system: hard links to the store.
	a, _ := os.Stat(k.Kernel.Path)
	b, _ := os.Stat(ba.Kernel)
	if !os.SameFile(a, b) {
		t.Errorf("staged kernel is not a hard link of %s", k.Kernel.Path)
	}
	tree, err := kernels.HashTree(ba.Modules)
	if err != nil || tree.SHA256 != k.Modules.SHA256 {
		t.Errorf("staged modules tree hash = %s (%v), want %s", tree.SHA256, err, k.Modules.SHA256)
	}
	// Re-staging a kernel without initrd and modules replaces and removes.
	bare := k
	bare.Initrd, bare.Modules = nil, nil
	ba2, err := kernels.StageBootArtifacts(context.Background(), bare, img)
	if err != nil || ba2.Initrd != "" || ba2.Modules != "" {
		t.Fatalf("re-stage = %+v, %v", ba2, err)
	}
	ents, _ := os.ReadDir(img)
	if len(ents) != 1 || ents[0].Name() != "kernel" {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("image dir after re-stage holds %v, want only kernel", names)
	}
}

func TestInstallModulesIntoExt4(t *testing.T) {
	testutil.RequiresTool(t, "mkfs.ext4", "debugfs", "e2fsck")
	dir := t.TempDir()
	// A small modules tree with awkward (but legal) names.
	mods := filepath.Join(dir, "9.9.9-test")
	files := map[string]string{
		"modules.dep":                         "kernel/a.ko:\n",
		"kernel/a.ko":                         "\x7fELF module a",
		`kernel/we"ird name #1/-b.ko`:         "\x7fELF module b",
		"kernel/<12>/c.ko":                    "\x7fELF module c",
		"kernel/sub dir/with\\backslash.ko  ": "\x7fELF module d",
	}
	for name, data := range files {
		p := filepath.Join(mods, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name   string
		merged bool
		base   string
	}{
		{"merged usr", true, "/usr/lib/modules/9.9.9-test"},
		{"plain lib", false, "/lib/modules/9.9.9-test"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tree := filepath.Join(t.TempDir(), "tree")
			if err := os.MkdirAll(filepath.Join(tree, "usr", "lib"), 0o755); err != nil {
				t.Fatal(err)
			}
			if tc.merged {
				if err := os.Symlink("usr/lib", filepath.Join(tree, "lib")); err != nil {
					t.Fatal(err)
				}
			}
			img := filepath.Join(t.TempDir(), "root.ext4")
			if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, img, "16M").CombinedOutput(); err != nil {
				t.Fatalf("mkfs.ext4: %v\n%s", err, out)
			}
			if err := kernels.InstallModules(context.Background(), img, mods, "9.9.9-test"); err != nil {
				t.Fatalf("InstallModules: %v", err)
			}
			if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
				t.Fatalf("e2fsck after InstallModules: %v\n%s", err, out)
			}
			for name, data := range files {
				out := filepath.Join(t.TempDir(), "dump")
				p := tc.base + "/" + name
				q := `"` + strings.ReplaceAll(p, `"`, `""`) + `"`
				if b, err := exec.Command("debugfs", "-R", "dump "+q+" "+out, img).CombinedOutput(); err != nil {
					t.Fatalf("debugfs dump %s: %v\n%s", p, err, b)
				}
				got, err := os.ReadFile(out)
				if err != nil || string(got) != data {
					t.Errorf("%s in the image = %q (%v), want %q", p, got, err, data)
				}
				st, err := exec.Command("debugfs", "-R", "stat "+q, img).Output()
				if err != nil || !strings.Contains(string(st), "User:     0   Group:     0") || !strings.Contains(string(st), "Mode:  0644") {
					t.Errorf("%s: not root-owned 0644:\n%s", p, firstLines(string(st), 3))
				}
			}
			if err := kernels.InstallModules(context.Background(), img, mods, "9.9.9-test"); !errors.Is(err, kernels.ErrExists) {
				t.Errorf("second InstallModules: %v, want ErrExists", err)
			}
		})
	}
	// A control byte in a name is refused before debugfs runs.
	bad := filepath.Join(dir, "bad", "1.0")
	if err := os.MkdirAll(filepath.Join(bad, "x\ny"), 0o755); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "bad.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img, "8M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	if err := kernels.InstallModules(context.Background(), img, bad, "1.0"); !errors.Is(err, kernels.ErrUnsafeName) {
		t.Errorf("InstallModules with a newline in a name: %v, want ErrUnsafeName", err)
	}
}

func firstLines(s string, n int) string {
	l := strings.SplitN(s, "\n", n+1)
	if len(l) > n {
		l = l[:n]
	}
	return strings.Join(l, "\n")
}
