package repotest

import (
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/bangerdev/banger/"

// imports returns, for every package dir of the repository (relative,
// slash-separated), the banger packages its non-test files import.
func imports(t *testing.T) map[string][]string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string]bool{}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" || d.Name() == "bin") && p != root {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		af, err := parser.ParseFile(token.NewFileSet(), p, nil, parser.ImportsOnly)
		if err != nil {
			t.Errorf("parse %s: %v", p, err)
			return nil
		}
		rel, _ := filepath.Rel(root, filepath.Dir(p))
		rel = filepath.ToSlash(rel)
		if out[rel] == nil {
			out[rel] = map[string]bool{}
		}
		for _, im := range af.Imports {
			path, _ := strconv.Unquote(im.Path.Value)
			if strings.HasPrefix(path, module) {
				out[rel][strings.TrimPrefix(path, module)] = true
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	res := map[string][]string{}
	for dir, set := range out {
		res[dir] = []string{}
		for p := range set {
			res[dir] = append(res[dir], p)
		}
		sort.Strings(res[dir])
	}
	return res
}

// allowed says which banger packages a low-level package may import: a
// package named here imports nothing of banger but what its entry lists
// (an entry ending in "/" allows that whole tree). Higher packages (the
// daemon and its services, the CLI) are not restricted by this table.
var allowed = map[string][]string{
	"internal/api":        {"internal/guestabi", "internal/model", "internal/progress"},
	"internal/atomicfile": {},
	"internal/kvm":        {},
	"internal/lockfile":   {},
	"internal/guestabi":   {},
	"internal/model":      {"internal/blockdev", "internal/guestabi", "internal/mounts", "internal/netctl", "internal/portfwd", "internal/vmm"},
	"internal/privdir":    {},
	"internal/progress":   {},
	"internal/units":      {},
	"internal/testutil":   {"internal/kvm"},
	"internal/subpath":    {},
	"internal/failpoint":  {},
	"internal/supervisor": {"internal/agent", "internal/model", "internal/vmm"},
}

// forbidden says which packages a service may not import: the composition
// root sits on top, the services beside each other only downwards
// (reconciler → lifecycle → supervisor), and nothing imports the daemon.
var forbidden = map[string][]string{
	"internal/lifecycle":  {"internal/daemon", "internal/reconciler", "internal/images"},
	"internal/reconciler": {"internal/daemon", "internal/images"},
	"internal/images":     {"internal/daemon", "internal/lifecycle", "internal/reconciler", "internal/supervisor"},
}

// TestServiceLayers fails when a service imports a package above it or a
// sibling it must not know, or when anything but the CLI and the daemon's
// own test helpers imports the daemon.
func TestServiceLayers(t *testing.T) {
	im := imports(t)
	for pkg, bad := range forbidden {
		if _, ok := im[pkg]; !ok {
			t.Errorf("package %s is listed in the layering table but has no Go files", pkg)
		}
		for _, dep := range im[pkg] {
			for _, b := range bad {
				if dep == b {
					t.Errorf("%s imports %s, which it must not", pkg, dep)
				}
			}
		}
	}
	for pkg, deps := range im {
		for _, dep := range deps {
			if dep == "internal/daemon" && !strings.HasPrefix(pkg, "cmd/") && pkg != "internal/daemon/daemontest" {
				t.Errorf("%s imports the daemon; only cmd/ and internal/daemon/daemontest may", pkg)
			}
		}
	}
}

// TestNoUpwardImports fails when a low-level package imports a higher one
// (for example testutil importing vmm), which is how import cycles and
// tangled layers start.
func TestNoUpwardImports(t *testing.T) {
	im := imports(t)
	for pkg, ok := range allowed {
		got, found := im[pkg]
		if !found {
			t.Errorf("package %s is listed in the layering table but has no Go files", pkg)
			continue
		}
	next:
		for _, dep := range got {
			for _, a := range ok {
				if dep == a || (strings.HasSuffix(a, "/") && strings.HasPrefix(dep, a)) {
					continue next
				}
			}
			t.Errorf("%s imports %s, a higher package; it may import only %v", pkg, dep, ok)
		}
	}
}
