package repotest

import (
	"bufio"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestDirectDependenciesNotIndirect fails when go.mod marks a module
// "// indirect" although a Go file of the repository (tests included)
// imports one of its packages: the mark then hides a direct dependency
// (run go mod tidy).
func TestDirectDependenciesNotIndirect(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(root, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var indirect []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if !strings.HasSuffix(line, "// indirect") {
			continue
		}
		fields := strings.Fields(strings.TrimPrefix(line, "require "))
		if len(fields) > 0 {
			indirect = append(indirect, fields[0])
		}
	}
	if len(indirect) == 0 {
		t.Fatal("go.mod marks no module indirect: is this the right go.mod?")
	}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" || d.Name() == "bin") && p != root {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") {
			return nil
		}
		af, err := parser.ParseFile(token.NewFileSet(), p, nil, parser.ImportsOnly)
		if err != nil {
			t.Errorf("parse %s: %v", p, err)
			return nil
		}
		for _, im := range af.Imports {
			path, _ := strconv.Unquote(im.Path.Value)
			for _, m := range indirect {
				if path == m || strings.HasPrefix(path, m+"/") {
					rel, _ := filepath.Rel(root, p)
					t.Errorf("%s imports %s, but go.mod marks %s // indirect: run go mod tidy", rel, path, m)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
