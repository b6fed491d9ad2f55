package e2etest

import (
	"archive/tar"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Registry is Debian's docker-registry serving on 127.0.0.1:5000 inside a
// namespace.
type Registry struct {
	Addr string
}

// StartRegistry starts docker-registry in ns; it stops with the test.
func StartRegistry(t testing.TB, ns *NetNS) *Registry {
	t.Helper()
	testutil.RequiresTool(t, "docker-registry", "skopeo")
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yml")
	conf := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:5000\n", filepath.Join(dir, "data"))
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "registry.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := ns.Cmd("docker-registry", "serve", cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := Start(cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		// dash has no /dev/tcp; bash does.
		if err := Run(ns.Cmd("bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/5000")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("docker-registry did not come up in the namespace:\n%s", b)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return &Registry{Addr: "127.0.0.1:5000"}
}

// Push copies an OCI layout into the registry as repo:test and returns the
// reference.
func (r *Registry) Push(t testing.TB, ns *NetNS, layoutDir, repo string) string {
	t.Helper()
	ref := r.Addr + "/" + repo + ":test"
	ns.MustRun(t, "skopeo", "copy", "--quiet", "--dest-tls-verify=false", "oci:"+layoutDir+":test", "docker://"+ref)
	return ref
}

// DebianLayout returns an OCI image layout (cached) holding the Debian test
// root filesystem (testutil.DebianRootfsTar) as a single gzip layer, tagged
// "test".
func DebianLayout(t testing.TB, variant string, packages []string) string {
	t.Helper()
	tarPath := testutil.DebianRootfsTar(t, variant, packages)
	if variant == "" {
		variant = "std"
	}
	return testutil.CachedDir(t, "oci-debian-"+variant, []string{tarPath}, func(dir string) error {
		return writeLayout(dir, tarPath)
	})
}

// MiniLayout is an OCI layout holding testutil.MiniRootfsTar, tagged "test":
// an image that pulls in a second and is not meant to boot.
func MiniLayout(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	tarPath := testutil.MiniRootfsTar(t, dir, "restart-test")
	out := filepath.Join(dir, "layout")
	if err := writeLayout(out, tarPath); err != nil {
		t.Fatal(err)
	}
	return out
}

// writeLayout writes an OCI layout at dir with one image, tagged "test",
// whose single layer is the tarball at tarPath and whose run config is
// ImageConfig's (Cmd /sbin/init).
func writeLayout(dir, tarPath string) error {
	return writeLayoutWithConfig(dir, v1.Config{Cmd: []string{"/sbin/init"}}, tarPath)
}

// LayoutOf writes, under t.TempDir(), an OCI layout holding the tarball at
// tarPath as its one layer with the run config cfg, tagged "test", and
// returns its dir.
func LayoutOf(t *testing.T, tarPath string, cfg v1.Config) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "layout")
	if err := writeLayoutWithConfig(dir, cfg, tarPath); err != nil {
		t.Fatal(err)
	}
	return dir
}

// BusyboxLayout writes, under t.TempDir(), an OCI layout of the busybox
// test root (testutil.BusyboxRootfsTar) whose main process is
// `sh -c script`, and returns its dir. files adds a second layer holding,
// for each guest path (relative, e.g. "bin/udpecho"), the host file named
// (mode 0755): test programs the script runs.
func BusyboxLayout(t *testing.T, script string, files map[string]string) string {
	t.Helper()
	tars := []string{testutil.BusyboxRootfsTar(t)}
	if len(files) > 0 {
		extra := filepath.Join(t.TempDir(), "extra.tar")
		if err := writeFilesTar(extra, files); err != nil {
			t.Fatal(err)
		}
		tars = append(tars, extra)
	}
	dir := filepath.Join(t.TempDir(), "layout")
	cfg := v1.Config{Cmd: []string{"sh", "-c", script}, Env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}}
	if err := writeLayoutWithConfig(dir, cfg, tars...); err != nil {
		t.Fatal(err)
	}
	return dir
}

// SetupBusybox is SetupWith for a busybox image (BusyboxLayout of script
// and files) pulled as imageName.
func SetupBusybox(t *testing.T, daemonCfg map[string]any, imageName, script string, files map[string]string) *Env {
	t.Helper()
	testutil.RequiresVM(t)
	layoutDir := BusyboxLayout(t, script, files)
	return SetupWith(t, daemonCfg, imageName, func(ns *NetNS, reg *Registry) string {
		return reg.Push(t, ns, layoutDir, "banger/"+imageName)
	})
}

// writeFilesTar writes a tarball at out holding each host file of files
// at its guest path, mode 0755, owned by root, with its parent dirs.
func writeFilesTar(out string, files map[string]string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	dirs := map[string]bool{}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		clean := filepath.Clean(name)
		if filepath.IsAbs(clean) || clean == "." || strings.HasPrefix(clean, "..") {
			return fmt.Errorf("layer file %q: want a relative path inside the image", name)
		}
		b, err := os.ReadFile(files[name])
		if err != nil {
			return err
		}
		var parents []string // shortest first
		for d := filepath.Dir(clean); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
			parents = append([]string{d}, parents...)
		}
		for _, d := range parents {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755}); err != nil {
				return err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: clean, Mode: 0o755, Size: int64(len(b))}); err != nil {
			return err
		}
		if _, err := tw.Write(b); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}

func writeLayoutWithConfig(dir string, cfg v1.Config, tarPaths ...string) error {
	var layers []v1.Layer
	for _, p := range tarPaths {
		layer, err := tarball.LayerFromFile(p, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return err
		}
		layers = append(layers, layer)
	}
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS, cf.Config = "amd64", "linux", cfg
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	img = mutate.ConfigMediaType(mutate.MediaType(img, types.OCIManifestSchema1), types.OCIConfigJSON)
	return WriteLayout(dir, img)
}

// WriteLayout writes img as the only image of a new OCI layout at dir,
// tagged "test".
func WriteLayout(dir string, img v1.Image) error {
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	return p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "test"}))
}

// ImageConfig returns img's config for linux/amd64 with /sbin/init as its
// command.
func ImageConfig(img v1.Image) (*v1.ConfigFile, error) {
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Config.Cmd = []string{"/sbin/init"}
	return cf, nil
}
