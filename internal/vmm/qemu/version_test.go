package qemu

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestVersionAskedOncePerBinary: Version runs the binary once and answers
// from its cache while the file is unchanged; a binary replaced in place
// is asked again.
func TestVersionAskedOncePerBinary(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "qemu-system-x86_64")
	count := filepath.Join(dir, "runs")
	write := func(version string) {
		t.Helper()
		script := "#!/bin/sh\necho run >> " + count + "\necho 'QEMU emulator version " + version + " (Debian 1:" + version + "+dfsg-7)'\necho 'Copyright'\n"
		tmp := bin + ".new"
		if err := os.WriteFile(tmp, []byte(script), 0o755); err != nil { //nolint:gosec // a test program
			t.Fatal(err)
		}
		if err := os.Rename(tmp, bin); err != nil { // a new inode, as a package upgrade makes
			t.Fatal(err)
		}
	}
	runs := func() int {
		b, _ := os.ReadFile(count) //nolint:gosec // the test's file
		return len(b) / len("run\n")
	}
	m := &Monitor{Binary: bin}
	ctx := context.Background()
	write("7.2.22")
	for i := 0; i < 3; i++ {
		v, err := m.Version(ctx)
		if err != nil || v != "QEMU 7.2.22 (Debian 1:7.2.22+dfsg-7)" {
			t.Fatalf("Version = %q, %v", v, err)
		}
	}
	if n := runs(); n != 1 {
		t.Errorf("the binary ran %d times for 3 Version calls, want 1", n)
	}
	write("8.0.1")
	if v, err := m.Version(ctx); err != nil || v != "QEMU 8.0.1 (Debian 1:8.0.1+dfsg-7)" {
		t.Errorf("Version after the binary was replaced = %q, %v; want 8.0.1", v, err)
	}
	if n := runs(); n != 2 {
		t.Errorf("the binary ran %d times, want 2 (asked again once replaced)", n)
	}
}
