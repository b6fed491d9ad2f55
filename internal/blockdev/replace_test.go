package blockdev

import (
	"os"
	"path/filepath"
	"testing"
)

// TestRenameOver: the new file takes the name, the old one lives on under
// <disk>.replaced until drop, and a failed rename leaves dst as it was.
func TestRenameOver(t *testing.T) {
	dir := t.TempDir()
	dst, src := filepath.Join(dir, "disk.ext4"), filepath.Join(dir, "disk.ext4.partial")
	write := func(p, s string) {
		t.Helper()
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	read := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			return "<" + err.Error() + ">"
		}
		return string(b)
	}
	write(dst, "old")
	write(src, "new")
	drop, err := RenameOver(src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if got := read(dst); got != "new" {
		t.Errorf("dst holds %q, want new", got)
	}
	if got := read(dst + ReplacedSuffix); got != "old" {
		t.Errorf("the old file under %s: %q", ReplacedSuffix, got)
	}
	drop()
	drop()
	if _, err := os.Stat(dst + ReplacedSuffix); !os.IsNotExist(err) {
		t.Errorf("after drop: %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("left in the dir: %v", ents)
	}

	// No old file: nothing to keep.
	fresh := filepath.Join(dir, "fresh.ext4")
	write(src, "first")
	drop, err = RenameOver(src, fresh)
	if err != nil || read(fresh) != "first" {
		t.Fatalf("rename to a new name: %v, %q", err, read(fresh))
	}
	drop()

	// A failed rename (src missing) leaves dst and no second link.
	if _, err := RenameOver(filepath.Join(dir, "missing"), dst); err == nil {
		t.Fatal("rename of a missing file succeeded")
	}
	if got := read(dst); got != "new" {
		t.Errorf("dst after a failed rename: %q", got)
	}
	if _, err := os.Stat(dst + ReplacedSuffix); !os.IsNotExist(err) {
		t.Errorf("a failed rename left %s: %v", ReplacedSuffix, err)
	}
}
