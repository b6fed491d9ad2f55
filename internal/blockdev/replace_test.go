package blockdev

import (
	"os"
	"path/filepath"
	"testing"
)

func writeFile(t *testing.T, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func readFile(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return "<" + err.Error() + ">"
	}
	return string(b)
}

// TestRenameOver: the new file takes the name, the old one lives on under
// <disk>.replaced until drop, and a failed rename leaves dst as it was.
func TestRenameOver(t *testing.T) {
	dir := t.TempDir()
	dst, src := filepath.Join(dir, "disk.ext4"), filepath.Join(dir, "disk.ext4.partial")
	writeFile(t, dst, "old")
	writeFile(t, src, "new")
	drop, err := RenameOver(src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if got := readFile(dst); got != "new" {
		t.Errorf("dst holds %q, want new", got)
	}
	if got := readFile(dst + ReplacedSuffix); got != "old" {
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
	writeFile(t, src, "first")
	drop, err = RenameOver(src, fresh)
	if err != nil || readFile(fresh) != "first" {
		t.Fatalf("rename to a new name: %v, %q", err, readFile(fresh))
	}
	drop()

	// A failed rename (src missing) leaves dst where it was.
	if _, err := RenameOver(filepath.Join(dir, "missing"), dst); err == nil {
		t.Fatal("rename of a missing file succeeded")
	}
	if got := readFile(dst); got != "new" {
		t.Errorf("dst after a failed rename: %q", got)
	}
	if _, err := os.Stat(dst + ReplacedSuffix); !os.IsNotExist(err) {
		t.Errorf("a failed rename left %s: %v", ReplacedSuffix, err)
	}
}

// TestRecoverReplaced: a leftover beside its disk is removed; one whose
// disk is missing (a crash between the renames) is put back, without the
// marker written for the copy that never took the name.
func TestRecoverReplaced(t *testing.T) {
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.ext4")
	if what, err := RecoverReplaced(disk); what != "" || err != nil {
		t.Fatalf("nothing to do: %q, %v", what, err)
	}

	writeFile(t, disk, "new")
	writeFile(t, disk+ReplacedSuffix, "old")
	if what, err := RecoverReplaced(disk); what == "" || err != nil {
		t.Fatalf("beside its disk: %q, %v", what, err)
	}
	if readFile(disk) != "new" {
		t.Errorf("the disk changed: %q", readFile(disk))
	}
	if _, err := os.Stat(disk + ReplacedSuffix); !os.IsNotExist(err) {
		t.Errorf("leftover kept: %v", err)
	}

	if err := os.Remove(disk); err != nil {
		t.Fatal(err)
	}
	writeFile(t, disk+ReplacedSuffix, "old")
	writeFile(t, disk+UnflushedSuffix, "some-boot\n")
	if what, err := RecoverReplaced(disk); what == "" || err != nil {
		t.Fatalf("disk missing: %q, %v", what, err)
	}
	if readFile(disk) != "old" {
		t.Errorf("the old disk was not put back: %q", readFile(disk))
	}
	for _, p := range []string{disk + ReplacedSuffix, disk + UnflushedSuffix} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left: %v", p, err)
		}
	}
}
