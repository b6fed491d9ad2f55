package initramfs

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// DefaultModules are the modules a banger guest needs before its root file
// system can be mounted and its agent reached: the virtio transports (MMIO
// for Firecracker, PCI for QEMU), the block, network and console drivers,
// and the vsock transport. Their dependencies are added by ResolveModules.
var DefaultModules = []string{
	"virtio_mmio",
	"virtio_pci",
	"virtio_blk",
	"virtio_net",
	"virtio_console",
	"vmw_vsock_virtio_transport",
}

// OptionalModules are loaded too when the kernel has them, and left out
// when it does not: virtio_rng feeds the guest's random pool from the host
// (QEMU's virtio-rng-pci), so that nothing in the guest waits on an
// uninitialized pool at boot (an agent or sshd making its host key under
// emulation waited seconds for it).
var OptionalModules = []string{"virtio_rng"}

// ErrModuleNotFound is returned when a wanted module is neither built into
// the kernel nor listed in modules.dep.
var ErrModuleNotFound = errors.New("module not found")

// Module is one module to load, in a resolved load order.
type Module struct {
	Name string // normalised module name, e.g. "virtio_blk"
	Path string // path relative to the modules dir, as in modules.dep
}

// ModuleName turns a module file path or name into the kernel's module
// name: base name without ".ko" and compression suffixes, '-' as '_'.
func ModuleName(p string) string {
	n := path.Base(filepath.ToSlash(p))
	for _, suf := range []string{".xz", ".zst", ".gz"} {
		n = strings.TrimSuffix(n, suf)
	}
	n = strings.TrimSuffix(n, ".ko")
	return strings.ReplaceAll(n, "-", "_")
}

// ResolveModules reads modules.dep (and modules.builtin) in modulesDir, a
// depmod'ed lib/modules/<version> tree, and returns the modules to load for
// names, dependencies first, each once. Built-in modules are left out.
func ResolveModules(modulesDir string, names []string) ([]Module, error) {
	deps, err := readModulesDep(filepath.Join(modulesDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	builtin, err := readBuiltin(filepath.Join(modulesDir, "modules.builtin"))
	if err != nil {
		return nil, err
	}
	var order []Module
	done := map[string]bool{}
	visiting := map[string]bool{}
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		if done[name] {
			return nil
		}
		e, ok := deps[name]
		if !ok {
			if builtin[name] {
				done[name] = true
				return nil
			}
			return fmt.Errorf("%s (wanted by %s): neither in modules.dep nor in modules.builtin of %s: %w",
				name, strings.Join(chain, " <- "), modulesDir, ErrModuleNotFound)
		}
		if visiting[name] {
			return fmt.Errorf("module dependency cycle through %s", name)
		}
		visiting[name] = true
		// modules.dep lists the full closure, nearest dependency first;
		// loading it back to front gives an order modprobe would use.
		for i := len(e.deps) - 1; i >= 0; i-- {
			if err := visit(ModuleName(e.deps[i]), append(chain, name)); err != nil {
				return err
			}
		}
		visiting[name] = false
		done[name] = true
		order = append(order, Module{Name: name, Path: e.path})
		return nil
	}
	for _, n := range names {
		if err := visit(ModuleName(n), []string{"banger"}); err != nil {
			return nil, err
		}
	}
	return order, nil
}

type depEntry struct {
	path string
	deps []string
}

func readModulesDep(p string) (map[string]depEntry, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("read modules.dep (run depmod for the tree first): %w", err)
	}
	defer f.Close()
	out := map[string]depEntry{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		mod, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		if err := checkModPath(mod); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		deps := strings.Fields(rest)
		for _, d := range deps {
			if err := checkModPath(d); err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
		}
		out[ModuleName(mod)] = depEntry{path: mod, deps: deps}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	return out, nil
}

func readBuiltin(p string) (map[string]bool, error) {
	out := map[string]bool{}
	data, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read modules.builtin: %w", err)
	}
	for _, l := range strings.Fields(string(data)) {
		out[ModuleName(l)] = true
	}
	return out, nil
}

// checkModPath accepts a clean relative path without control bytes.
func checkModPath(p string) error {
	if p == "" || strings.HasPrefix(p, "/") || path.Clean(p) != p || p == ".." || strings.HasPrefix(p, "../") {
		return fmt.Errorf("unsafe module path %q", p)
	}
	for i := 0; i < len(p); i++ {
		if p[i] < 0x20 || p[i] == 0x7f {
			return fmt.Errorf("unsafe module path %q", p)
		}
	}
	return nil
}

// addOptional appends to mods each of names the kernel has (with its
// dependencies not in mods yet); a name neither in modules.dep nor built
// in is left out.
func addOptional(modulesDir string, mods []Module, names []string) ([]Module, error) {
	have := map[string]bool{}
	for _, m := range mods {
		have[m.Name] = true
	}
	for _, n := range names {
		extra, err := ResolveModules(modulesDir, []string{n})
		if errors.Is(err, ErrModuleNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, m := range extra {
			if !have[m.Name] {
				have[m.Name] = true
				mods = append(mods, m)
			}
		}
	}
	return mods, nil
}
