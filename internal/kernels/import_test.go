package kernels_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/kernels/initramfs"
)

func TestImportDebDebianCloud(t *testing.T) {
	k := debianKernel(t)
	if k.Format != kernels.FormatBzImage || !strings.HasSuffix(k.Version, "-cloud-amd64") || k.Arch != "x86_64" {
		t.Fatalf("ImportDeb record = %+v; want a bzImage of a *-cloud-amd64 release", k)
	}
	if k.Initrd == nil || k.Modules == nil {
		t.Fatalf("ImportDeb record has no initrd or modules: %+v", k)
	}
	for _, a := range []string{k.Kernel.Path, k.Initrd.Path} {
		got, err := kernels.HashFile(a)
		if err != nil {
			t.Fatal(err)
		}
		if got.SHA256 != map[string]string{k.Kernel.Path: k.Kernel.SHA256, k.Initrd.Path: k.Initrd.SHA256}[a] {
			t.Errorf("sha256 of %s = %s, record says otherwise", a, got.SHA256)
		}
	}
	if k.Modules.Path != filepath.Join(k.Dir, "modules", k.Version) {
		t.Errorf("modules path = %s", k.Modules.Path)
	}
	if _, err := os.Stat(filepath.Join(k.Modules.Path, "modules.dep")); err != nil {
		t.Errorf("depmod did not run: %v", err)
	}
	tree, err := kernels.HashTree(k.Modules.Path)
	if err != nil || tree.SHA256 != k.Modules.SHA256 {
		t.Errorf("HashTree(modules) = %v, %v; record says %s", tree.SHA256, err, k.Modules.SHA256)
	}
	// The initramfs holds the default modules and their dependencies.
	mods, err := initramfs.ResolveModules(k.Modules.Path, initramfs.DefaultModules)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, m := range mods {
		names[m.Name] = true
	}
	for _, want := range []string{"virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"} {
		if !names[want] {
			t.Errorf("resolved modules lack %s: %v", want, mods)
		}
	}
	// Staging leftovers are gone.
	ents, _ := os.ReadDir(filepath.Dir(k.Dir))
	for _, e := range ents {
		if strings.Contains(e.Name(), kernels.StagingInfix) {
			t.Errorf("staging dir left behind: %s", e.Name())
		}
	}
	// A second import to the same directory is refused.
	if _, err := kernels.ImportDeb(context.Background(), k.Dir, "debian-cloud", "/nonexistent.deb", kernels.DebOptions{InitBinary: initBinary(t)}); !errors.Is(err, kernels.ErrExists) {
		t.Errorf("second ImportDeb to %s: err = %v, want ErrExists", k.Dir, err)
	}
}

func TestImportFiles(t *testing.T) {
	src := debianKernel(t)
	dir := t.TempDir()
	// A modules tree without modules.dep gets depmod'ed.
	mods := filepath.Join(dir, "src", src.Version)
	if err := os.MkdirAll(filepath.Dir(mods), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := copyDir(src.Modules.Path, mods); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(mods, "modules.dep")); err != nil {
		t.Fatal(err)
	}
	k, err := kernels.ImportFiles(context.Background(), filepath.Join(dir, "kernels", "k1"), "k1", src.Kernel.Path, src.Initrd.Path, mods)
	if err != nil {
		t.Fatalf("ImportFiles: %v", err)
	}
	if k.Version != src.Version || k.Format != kernels.FormatBzImage || k.Source != kernels.SourceImport {
		t.Errorf("ImportFiles record = %+v", k)
	}
	if k.Kernel.SHA256 != src.Kernel.SHA256 || k.Initrd.SHA256 != src.Initrd.SHA256 {
		t.Errorf("copied artifacts hash differently: %s/%s vs %s/%s", k.Kernel.SHA256, k.Initrd.SHA256, src.Kernel.SHA256, src.Initrd.SHA256)
	}
	if _, err := os.Stat(filepath.Join(k.Modules.Path, "modules.dep")); err != nil {
		t.Errorf("modules.dep not regenerated: %v", err)
	}

	// Kernel only.
	k2, err := kernels.ImportFiles(context.Background(), filepath.Join(dir, "kernels", "k2"), "k2", src.Kernel.Path, "", "")
	if err != nil || k2.Initrd != nil || k2.Modules != nil || k2.Version != src.Version {
		t.Errorf("ImportFiles(kernel only) = %+v, %v", k2, err)
	}

	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(bad, []byte("not a kernel at all"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, kname, kernel, mods string
		want                      error
	}{
		{"bad name", "Bad/Name", src.Kernel.Path, "", nil},
		{"not a kernel", "k3", bad, "", kernels.ErrUnknownFormat},
		{"exists", "k1", src.Kernel.Path, "", kernels.ErrExists},
		{"modules of another release", "k4", src.Kernel.Path, filepath.Join(dir, "src"), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(dir, "kernels", tc.kname)
			_, err := kernels.ImportFiles(context.Background(), dst, tc.kname, tc.kernel, "", tc.mods)
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Fatalf("ImportFiles(%s) err = %v, want %v", tc.name, err, tc.want)
			}
			if !errors.Is(tc.want, kernels.ErrExists) {
				if _, serr := os.Stat(dst); serr == nil {
					t.Errorf("failed import left %s behind", dst)
				}
			}
		})
	}
}

func copyDir(src, dst string) error {
	return filepath.Walk(src, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		if info.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(target, data, 0o644)
	})
}
