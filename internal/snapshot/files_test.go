package snapshot

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestFileSHA256 checks that the checksum depends on the bytes only: a
// sparse file and a dense copy of it agree, and one changed byte, in data
// or in a hole, changes it.
func TestFileSHA256(t *testing.T) {
	dir := t.TempDir()
	sparse := filepath.Join(dir, "sparse")
	f, err := os.Create(sparse)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("data at 3 MiB"), 3<<20+17); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(9<<20 + 5); err != nil { // a short last chunk, in a hole
		t.Fatal(err)
	}
	f.Close()
	content, err := os.ReadFile(sparse)
	if err != nil {
		t.Fatal(err)
	}
	dense := filepath.Join(dir, "dense")
	if err := os.WriteFile(dense, content, 0o600); err != nil {
		t.Fatal(err)
	}
	sum := func(p string) string {
		s, err := fileSHA256(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	want := sum(dense)
	if got := sum(sparse); got != want {
		t.Errorf("sparse file sums to %s, its dense copy to %s", got, want)
	}
	for name, off := range map[string]int64{"data": 3<<20 + 20, "hole": 7 << 20, "last byte": 9<<20 + 4} {
		b := append([]byte(nil), content...)
		b[off] ^= 1
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if sum(p) == want {
			t.Errorf("a byte changed in the %s at %d: the sum did not change", name, off)
		}
	}
}
