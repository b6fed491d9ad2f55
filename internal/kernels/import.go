package kernels

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/kernels/initramfs"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
)

// Artifact names inside a kernel directory.
const (
	KernelFile = "kernel"
	InitrdFile = "initrd"
	ModulesDir = "modules"
)

// Sources a kernel record can have.
const (
	SourceImport  = "import"
	SourceCatalog = "catalog"
)

// Arch is the only architecture banger runs.
const Arch = "x86_64"

// ImportFiles imports a kernel from files into dstDir (which must not
// exist): kernel is a bzImage or vmlinux, initrd and modulesDir (a
// lib/modules/<version> tree) are optional. The modules tree is depmod'ed
// when it has no modules.dep. The version comes from the kernel header,
// else from the modules dir name; when both are known they must agree.
func ImportFiles(ctx context.Context, dstDir, name, kernel, initrd, modulesDir string) (model.Kernel, error) {
	return importFiles(ctx, dstDir, name, kernel, initrd, modulesDir, false)
}

// AdoptFiles is ImportFiles for inputs the caller owns and will delete
// afterwards (a catalog pull's verified downloads): files are hard-linked
// into dstDir where possible instead of copied. The caller must not modify
// the inputs afterwards.
func AdoptFiles(ctx context.Context, dstDir, name, kernel, initrd, modulesDir string) (model.Kernel, error) {
	return importFiles(ctx, dstDir, name, kernel, initrd, modulesDir, true)
}

func importFiles(ctx context.Context, dstDir, name, kernel, initrd, modulesDir string, link bool) (model.Kernel, error) {
	if err := model.ValidateName("kernel", name); err != nil {
		return model.Kernel{}, err
	}
	format, version, err := DetectFormat(kernel)
	if err != nil {
		return model.Kernel{}, fmt.Errorf("import kernel %q: %w", name, err)
	}
	if modulesDir != "" {
		st, err := os.Stat(modulesDir)
		if err != nil {
			return model.Kernel{}, fmt.Errorf("import kernel %q: modules: %w", name, err)
		}
		if !st.IsDir() {
			return model.Kernel{}, fmt.Errorf("import kernel %q: modules %s is not a directory", name, modulesDir)
		}
		dirVer := filepath.Base(filepath.Clean(modulesDir))
		if version == "" {
			version = dirVer
		} else if dirVer != version {
			return model.Kernel{}, fmt.Errorf("import kernel %q: modules dir %s is for release %q but the kernel is %q", name, modulesDir, dirVer, version)
		}
		if err := checkVersion(version); err != nil {
			return model.Kernel{}, fmt.Errorf("import kernel %q: %w", name, err)
		}
	}
	if initrd != "" {
		st, err := os.Stat(initrd)
		if err != nil {
			return model.Kernel{}, fmt.Errorf("import kernel %q: initrd: %w", name, err)
		}
		if !st.Mode().IsRegular() || st.Size() == 0 {
			return model.Kernel{}, fmt.Errorf("import kernel %q: initrd %s is not a non-empty regular file", name, initrd)
		}
	}
	staging, err := newStaging(dstDir)
	if err != nil {
		return model.Kernel{}, fmt.Errorf("import kernel %q: %w", name, err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = os.RemoveAll(staging)
		}
	}()
	place := cloneOrCopy
	if link {
		place = linkOrCopy
	}
	if err := place(kernel, filepath.Join(staging, KernelFile), 0o644); err != nil {
		return model.Kernel{}, fmt.Errorf("import kernel %q: copy kernel: %w", name, err)
	}
	if initrd != "" {
		if err := place(initrd, filepath.Join(staging, InitrdFile), 0o644); err != nil {
			return model.Kernel{}, fmt.Errorf("import kernel %q: copy initrd: %w", name, err)
		}
	}
	if modulesDir != "" {
		root := filepath.Join(staging, "root")
		tree := filepath.Join(root, "lib", "modules", version)
		if err := os.MkdirAll(filepath.Dir(tree), 0o755); err != nil {
			return model.Kernel{}, err
		}
		if err := copyTree(modulesDir, tree, link); err != nil {
			return model.Kernel{}, fmt.Errorf("import kernel %q: copy modules: %w", name, err)
		}
		if _, err := os.Stat(filepath.Join(tree, "modules.dep")); err != nil {
			if err := Depmod(ctx, root, version); err != nil {
				return model.Kernel{}, fmt.Errorf("import kernel %q: %w", name, err)
			}
		}
		if err := moveModules(staging, root, version); err != nil {
			return model.Kernel{}, fmt.Errorf("import kernel %q: %w", name, err)
		}
	}
	k, err := describe(staging, dstDir, name, format, version)
	if err != nil {
		return model.Kernel{}, fmt.Errorf("import kernel %q: %w", name, err)
	}
	k.Source, k.SourceRef = SourceImport, kernel
	if err := publish(staging, dstDir); err != nil {
		return model.Kernel{}, fmt.Errorf("import kernel %q: %w", name, err)
	}
	ok = true
	return k, nil
}

// DebOptions tunes ImportDeb.
type DebOptions struct {
	// InitBinary is the static banger-init the generated initramfs runs
	// (required: the package's virtio drivers are modules).
	InitBinary string
	// Modules for the initramfs; nil means initramfs.DefaultModules.
	Modules []string
	// Compression of the initramfs; "" picks gzip if the kernel config
	// allows it, else zstd.
	Compression string
	// Progress receives phase events; may be nil.
	Progress progress.Func
}

// ImportDeb imports the kernel in a Debian/Ubuntu linux-image package
// (.deb) into dstDir (which must not exist): it takes boot/vmlinuz-<ver>
// and lib/modules/<ver>/, runs depmod for the tree and generates the
// initramfs. The package is untrusted input: only plain files under boot/
// and lib/modules/ are taken, with checked names.
func ImportDeb(ctx context.Context, dstDir, name, debPath string, opts DebOptions) (model.Kernel, error) {
	if err := model.ValidateName("kernel", name); err != nil {
		return model.Kernel{}, err
	}
	if opts.InitBinary == "" {
		return model.Kernel{}, fmt.Errorf("import kernel %q from %s: no banger-init binary to build the initramfs with", name, debPath)
	}
	staging, err := newStaging(dstDir)
	if err != nil {
		return model.Kernel{}, fmt.Errorf("import kernel %q: %w", name, err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = os.RemoveAll(staging)
		}
	}()
	wrap := func(err error) error { return fmt.Errorf("import kernel %q from %s: %w", name, debPath, err) }

	opts.Progress.Report(progress.Event{Phase: "extract", Item: filepath.Base(debPath)})
	root := filepath.Join(staging, "root")
	c, err := extractDeb(ctx, debPath, root)
	if err != nil {
		return model.Kernel{}, wrap(err)
	}
	opts.Progress.Report(progress.Event{Phase: "extract", Item: filepath.Base(debPath), Done: true})
	if c.ModulesDir == "" {
		return model.Kernel{}, wrap(fmt.Errorf("no lib/modules/%s tree: %w", c.Version, ErrBadPackage))
	}
	format, hdrVer, err := DetectFormat(c.Kernel)
	if err != nil {
		return model.Kernel{}, wrap(err)
	}
	if hdrVer != "" && hdrVer != c.Version {
		return model.Kernel{}, wrap(fmt.Errorf("vmlinuz-%s says it is release %q: %w", c.Version, hdrVer, ErrBadPackage))
	}
	cfg := map[string]string{}
	if c.Config != "" {
		if cfg, err = readKernelConfig(c.Config); err != nil {
			return model.Kernel{}, wrap(err)
		}
		for _, opt := range []string{"CONFIG_BLK_DEV_INITRD", "CONFIG_DEVTMPFS"} {
			if cfg[opt] != "y" {
				return model.Kernel{}, wrap(fmt.Errorf("kernel config has %s=%q; banger's initramfs needs it built in", opt, cfg[opt]))
			}
		}
	}
	comp := opts.Compression
	if comp == "" {
		comp = initramfs.Gzip
		if c.Config != "" && cfg["CONFIG_RD_GZIP"] != "y" && cfg["CONFIG_RD_ZSTD"] == "y" {
			comp = initramfs.Zstd
		}
	}

	opts.Progress.Report(progress.Event{Phase: "depmod", Item: c.Version})
	if err := Depmod(ctx, root, c.Version); err != nil {
		return model.Kernel{}, wrap(err)
	}
	if err := os.Rename(c.Kernel, filepath.Join(staging, KernelFile)); err != nil {
		return model.Kernel{}, wrap(err)
	}
	if err := moveModules(staging, root, c.Version); err != nil {
		return model.Kernel{}, wrap(err)
	}
	opts.Progress.Report(progress.Event{Phase: "initramfs", Item: c.Version})
	t0 := time.Now()
	info, err := initramfs.GenerateFile(ctx, filepath.Join(staging, InitrdFile), initramfs.Options{
		ModulesDir:  filepath.Join(staging, ModulesDir, c.Version),
		Version:     c.Version,
		InitBinary:  opts.InitBinary,
		Modules:     opts.Modules,
		Compression: comp,
	})
	if err != nil {
		return model.Kernel{}, wrap(err)
	}
	opts.Progress.Report(progress.Event{Phase: "initramfs", Item: c.Version, Done: true,
		Message: fmt.Sprintf("%d modules, %d bytes %s, %s", len(info.Modules), info.Size, info.Compression, time.Since(t0).Round(time.Millisecond))})
	if err := os.RemoveAll(root); err != nil {
		return model.Kernel{}, wrap(err)
	}
	k, err := describe(staging, dstDir, name, format, c.Version)
	if err != nil {
		return model.Kernel{}, wrap(err)
	}
	k.Source, k.SourceRef = SourceImport, filepath.Base(debPath)
	opts.Progress.Report(progress.Event{Phase: "publish", Item: name})
	if err := publish(staging, dstDir); err != nil {
		return model.Kernel{}, wrap(err)
	}
	ok = true
	return k, nil
}

// Depmod runs `depmod -b root version` so root/lib/modules/<version> gets
// its modules.dep and friends.
func Depmod(ctx context.Context, root, version string) error {
	if err := checkVersion(version); err != nil {
		return err
	}
	bin, err := exec.LookPath("depmod")
	if err != nil {
		for _, p := range []string{"/usr/sbin/depmod", "/sbin/depmod"} {
			if _, serr := os.Stat(p); serr == nil {
				bin, err = p, nil
				break
			}
		}
		if err != nil {
			return fmt.Errorf("depmod not found (install kmod): %w", err)
		}
	}
	cmd := exec.CommandContext(ctx, bin, "-b", root, version) //nolint:gosec // fixed program, checked version
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("depmod -b %s %s: %w: %s", root, version, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// moveModules moves root/lib/modules/<version> to staging/modules/<version>
// and removes the rest of root.
func moveModules(staging, root, version string) error {
	if err := os.Mkdir(filepath.Join(staging, ModulesDir), 0o755); err != nil {
		return err
	}
	if err := os.Rename(filepath.Join(root, "lib", "modules", version), filepath.Join(staging, ModulesDir, version)); err != nil {
		return err
	}
	return os.RemoveAll(root)
}

// describe builds the kernel record for a staged kernel dir, with paths as
// they will be after publishing to dstDir.
func describe(staging, dstDir, name, format, version string) (model.Kernel, error) {
	k := model.Kernel{Name: name, Version: version, Arch: Arch, Format: format, Dir: dstDir, Created: time.Now().UTC()}
	a, err := HashFile(filepath.Join(staging, KernelFile))
	if err != nil {
		return k, err
	}
	a.Path = rebase(a.Path, staging, dstDir)
	k.Kernel = a
	if _, err := os.Stat(filepath.Join(staging, InitrdFile)); err == nil {
		a, err := HashFile(filepath.Join(staging, InitrdFile))
		if err != nil {
			return k, err
		}
		a.Path = rebase(a.Path, staging, dstDir)
		k.Initrd = &a
	}
	if version != "" {
		tree := filepath.Join(staging, ModulesDir, version)
		if _, err := os.Stat(tree); err == nil {
			a, err := HashTree(tree)
			if err != nil {
				return k, err
			}
			a.Path = rebase(a.Path, staging, dstDir)
			k.Modules = &a
		}
	}
	return k, nil
}

// readKernelConfig parses a kernel .config into option -> value.
func readKernelConfig(p string) (map[string]string, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cfg := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if ok && strings.HasPrefix(k, "CONFIG_") {
			cfg[k] = v
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read kernel config %s: %w", p, err)
	}
	return cfg, nil
}
