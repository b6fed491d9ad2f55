package repotest

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNoBareSkips: every skip goes through internal/testutil's gates
// (RequiresRoot, RequiresTool, SkipIfShort, OptIn, Missing, ...), which skip
// with the reason and fail instead under CI=true when the tier is required.
// A bare t.Skip, t.Skipf or t.SkipNow anywhere else would let a CI run lose
// a tier silently.
func TestNoBareSkips(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	gates := filepath.Join(root, "internal", "testutil")
	files := 0
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") || d.Name() == "bin") && p != root {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || filepath.Dir(p) == gates {
			return nil
		}
		files++
		for _, bad := range bareSkips(t, p) {
			rel, _ := filepath.Rel(root, p)
			t.Errorf("%s:%s: a bare %s; skip through an internal/testutil gate (it fails under CI=true when the tier is required)", rel, bad.pos, bad.call)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 50 {
		t.Fatalf("scanned only %d Go files under %s", files, root)
	}
}

func TestBareSkipsFound(t *testing.T) {
	// The check itself: it sees each form of skip, and not a gate.
	dir := t.TempDir()
	p := filepath.Join(dir, "x_test.go")
	src := "package x\nimport \"testing\"\nfunc TestX(t *testing.T) {\n\tt.Skip(\"a\")\n\tt.Skipf(\"%s\", \"b\")\n\tt.SkipNow()\n\ttestutil.RequiresRoot(t)\n}\n"
	if err := os.WriteFile(p, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range bareSkips(t, p) {
		got = append(got, s.call)
	}
	if strings.Join(got, ",") != "t.Skip,t.Skipf,t.SkipNow" {
		t.Fatalf("bareSkips found %v, want t.Skip, t.Skipf, t.SkipNow", got)
	}
}

type skipCall struct{ pos, call string }

// bareSkips returns the Skip, Skipf and SkipNow calls in a Go file.
func bareSkips(t *testing.T, path string) []skipCall {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, path, nil, 0)
	if err != nil {
		t.Errorf("parse %s: %v", path, err)
		return nil
	}
	var out []skipCall
	ast.Inspect(f, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok {
			return true
		}
		sel, ok := call.Fun.(*ast.SelectorExpr)
		if !ok {
			return true
		}
		switch sel.Sel.Name {
		case "Skip", "Skipf", "SkipNow":
			recv := "?"
			if id, ok := sel.X.(*ast.Ident); ok {
				recv = id.Name
			}
			pos := fset.Position(call.Pos())
			out = append(out, skipCall{pos: strings.TrimPrefix(pos.String(), path+":"), call: recv + "." + sel.Sel.Name})
		}
		return true
	})
	return out
}
