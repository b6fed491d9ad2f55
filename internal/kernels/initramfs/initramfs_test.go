package initramfs_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/kernels/initramfs"
	"github.com/bangerdev/banger/internal/testutil"
)

// fakeModules writes a modules tree: name -> deps, files are tiny ELFs.
func fakeModules(t *testing.T) string {
	t.Helper()
	return fakeModulesWith(t, fakeDep)
}

const fakeDep = `kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/block/virtio_blk.ko.zst: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
`

// fakeModulesWith writes a modules tree with the modules.dep dep.
func fakeModulesWith(t *testing.T, dep string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "9.9.9-test")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/drivers/virtio/virtio_mmio.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(dep, "\n") {
		mod, _, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		p := filepath.Join(dir, mod)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		data := []byte("\x7fELF " + initramfs.ModuleName(mod))
		if strings.HasSuffix(mod, ".zst") {
			var b bytes.Buffer
			zw, _ := zstd.NewWriter(&b)
			_, _ = zw.Write(data)
			_ = zw.Close()
			data = b.Bytes()
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestResolveModules(t *testing.T) {
	dir := fakeModules(t)
	mods, err := initramfs.ResolveModules(dir, []string{"virtio_mmio", "virtio_pci", "virtio-blk", "vmw_vsock_virtio_transport"})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range mods {
		got = append(got, m.Name)
	}
	want := []string{"virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("load order (-want +got):\n%s", diff)
	}
	if _, err := initramfs.ResolveModules(dir, []string{"virtio_net"}); !errors.Is(err, initramfs.ErrModuleNotFound) {
		t.Errorf("ResolveModules(virtio_net) err = %v, want ErrModuleNotFound", err)
	}
}

// TestGenerateOptionalModules: with the default module set, virtio_rng
// (and what it needs) is listed last when the kernel has it, and its
// absence is no error.
func TestGenerateOptionalModules(t *testing.T) {
	base := fakeDep + `kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
`
	for name, tc := range map[string]struct {
		dep  string
		want string
	}{
		"with virtio_rng": {base + "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/char/hw_random/rng-core.ko kernel/drivers/virtio/virtio.ko\nkernel/drivers/char/hw_random/rng-core.ko:\n",
			"vmw_vsock_virtio_transport rng_core virtio_rng"},
		"without": {base, "vmw_vsock_virtio_transport"},
	} {
		t.Run(name, func(t *testing.T) {
			var buf bytes.Buffer
			info, err := initramfs.Generate(context.Background(), &buf, initramfs.Options{
				ModulesDir: fakeModulesWith(t, tc.dep), InitBinary: "/bin/true", Compression: initramfs.None,
			})
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range info.Modules {
				got = append(got, m.Name)
			}
			if s := strings.Join(got, " "); !strings.HasSuffix(s, " "+tc.want) {
				t.Errorf("modules %s, want them to end in %s", s, tc.want)
			}
		})
	}
}

func TestGenerateListsWithCpio(t *testing.T) {
	testutil.RequiresTool(t, "cpio")
	dir := fakeModules(t)
	for _, comp := range []string{initramfs.Gzip, initramfs.Zstd, initramfs.None} {
		t.Run(comp, func(t *testing.T) {
			var buf bytes.Buffer
			info, err := initramfs.Generate(context.Background(), &buf, initramfs.Options{
				ModulesDir: dir, InitBinary: "/bin/true", Compression: comp,
				Modules: []string{"virtio_pci", "virtio_blk", "vmw_vsock_virtio_transport"},
			})
			if err != nil {
				t.Fatal(err)
			}
			if info.Size != int64(buf.Len()) || len(info.SHA256) != 64 {
				t.Errorf("info = %+v, wrote %d bytes", info, buf.Len())
			}
			raw := decompress(t, comp, buf.Bytes())
			// GNU cpio is an independent reader of the newc format.
			out := filepath.Join(t.TempDir(), "x")
			if err := os.Mkdir(out, 0o755); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command("cpio", "-idm", "--quiet", "--no-absolute-filenames")
			cmd.Dir = out
			cmd.Stdin = bytes.NewReader(raw)
			// cpio cannot mknod dev/console without privilege; list instead when not root.
			if os.Geteuid() != 0 {
				cmd = exec.Command("cpio", "-it", "--quiet")
				cmd.Stdin = bytes.NewReader(raw)
			}
			b, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("cpio: %v\n%s", err, b)
			}
			list := listCpio(t, raw)
			for _, want := range []string{"init", "dev/console", "etc/banger/modules", "lib/modules/9.9.9-test/kernel/drivers/block/virtio_blk.ko", "newroot"} {
				if !strings.Contains(list, want+"\n") {
					t.Errorf("archive lacks %s:\n%s", want, list)
				}
			}
			if strings.Contains(list, ".zst") {
				t.Errorf("compressed module kept compressed:\n%s", list)
			}
			if os.Geteuid() == 0 {
				mods, _ := os.ReadFile(filepath.Join(out, "etc/banger/modules"))
				wantList := "# banger-init module load order, one path per line\n" +
					"/lib/modules/9.9.9-test/kernel/drivers/virtio/virtio.ko\n" +
					"/lib/modules/9.9.9-test/kernel/drivers/virtio/virtio_ring.ko\n" +
					"/lib/modules/9.9.9-test/kernel/drivers/virtio/virtio_pci_modern_dev.ko\n" +
					"/lib/modules/9.9.9-test/kernel/drivers/virtio/virtio_pci.ko\n" +
					"/lib/modules/9.9.9-test/kernel/drivers/block/virtio_blk.ko\n" +
					"/lib/modules/9.9.9-test/kernel/net/vmw_vsock/vsock.ko\n" +
					"/lib/modules/9.9.9-test/kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko\n" +
					"/lib/modules/9.9.9-test/kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko\n"
				if diff := cmp.Diff(wantList, string(mods)); diff != "" {
					t.Errorf("module list (-want +got):\n%s", diff)
				}
				blk, _ := os.ReadFile(filepath.Join(out, "lib/modules/9.9.9-test/kernel/drivers/block/virtio_blk.ko"))
				if string(blk) != "\x7fELF virtio_blk" {
					t.Errorf("virtio_blk.ko = %q, want it decompressed", blk)
				}
				initData, _ := os.ReadFile(filepath.Join(out, "init"))
				trueData, _ := os.ReadFile("/bin/true")
				if !bytes.Equal(initData, trueData) {
					t.Error("init differs from the binary given")
				}
				st, err := os.Stat(filepath.Join(out, "init"))
				if err != nil || st.Mode().Perm() != 0o755 {
					t.Errorf("init mode = %v, %v", st.Mode(), err)
				}
			}
			// Same inputs, same bytes.
			var again bytes.Buffer
			info2, err := initramfs.Generate(context.Background(), &again, initramfs.Options{
				ModulesDir: dir, InitBinary: "/bin/true", Compression: comp,
				Modules: []string{"virtio_pci", "virtio_blk", "vmw_vsock_virtio_transport"},
			})
			if err != nil || info2.SHA256 != info.SHA256 {
				t.Errorf("second Generate sha = %s (%v), first %s: not reproducible", info2.SHA256, err, info.SHA256)
			}
		})
	}
}

func TestGenerateErrors(t *testing.T) {
	dir := fakeModules(t)
	for _, tc := range []struct {
		name string
		opts initramfs.Options
	}{
		{"no init", initramfs.Options{ModulesDir: dir}},
		{"init not ELF", initramfs.Options{ModulesDir: dir, InitBinary: filepath.Join(dir, "modules.dep")}},
		{"missing module", initramfs.Options{ModulesDir: dir, InitBinary: "/bin/true", Modules: []string{"virtio_net"}}},
		{"bad compression", initramfs.Options{ModulesDir: dir, InitBinary: "/bin/true", Compression: "lz4"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := initramfs.Generate(context.Background(), io.Discard, tc.opts); err == nil {
				t.Errorf("Generate(%s) succeeded", tc.name)
			}
		})
	}
	// A module file that is not ELF is refused at generation time.
	if err := os.WriteFile(filepath.Join(dir, "kernel/net/vmw_vsock/vsock.ko"), []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := initramfs.Generate(context.Background(), io.Discard, initramfs.Options{ModulesDir: dir, InitBinary: "/bin/true"}); err == nil {
		t.Error("Generate with a corrupt vsock.ko succeeded")
	}
}

func decompress(t *testing.T, comp string, data []byte) []byte {
	t.Helper()
	var r io.Reader = bytes.NewReader(data)
	switch comp {
	case initramfs.Gzip:
		gr, err := gzip.NewReader(r)
		if err != nil {
			t.Fatal(err)
		}
		r = gr
	case initramfs.Zstd:
		zr, err := zstd.NewReader(r)
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		r = zr
	}
	raw, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func listCpio(t *testing.T, raw []byte) string {
	t.Helper()
	cmd := exec.Command("cpio", "-it", "--quiet")
	cmd.Stdin = bytes.NewReader(raw)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio -it: %v", err)
	}
	return string(out)
}
