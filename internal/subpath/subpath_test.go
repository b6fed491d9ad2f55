package subpath

import (
	"os"
	"path/filepath"
	"testing"
)

func TestInside(t *testing.T) {
	for _, c := range []struct {
		dir, path string
		want      bool
	}{
		{"/var/lib/banger", "/var/lib/banger/vms/a", true},
		{"/var/lib/banger", "/var/lib/banger", false},
		{"/var/lib/banger", "/var/lib/banger/", false},
		{"/var/lib/banger", "/var/lib/banger/..", false},
		{"/var/lib/banger", "/var/lib/banger/../banger-other/x", false},
		{"/var/lib/banger", "/var/lib/bangerx/a", false},
		{"/var/lib/banger", "/etc/passwd", false},
		{"/var/lib/banger", "/var/lib/banger/a/../../../etc", false},
		{"/var/lib/banger", "/var/lib/banger/a/../b", true},
		{"/var/lib/banger/", "/var/lib/banger/a", true},
	} {
		if got := Inside(c.dir, c.path); got != c.want {
			t.Errorf("Inside(%q, %q) = %v, want %v", c.dir, c.path, got, c.want)
		}
	}
}

func TestInsideResolved(t *testing.T) {
	base := t.TempDir()
	real := filepath.Join(base, "real")
	if err := os.Mkdir(real, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path string
		want bool
	}{
		{filepath.Join(link, "cow.img"), true},
		{filepath.Join(real, "cow.img"), true}, // what the kernel reports
		{"cow.img", false},
		{"", false},
		{filepath.Join(base, "other"), false},
	} {
		if got := InsideResolved(link, c.path); got != c.want {
			t.Errorf("InsideResolved(%q, %q) = %v, want %v", link, c.path, got, c.want)
		}
	}
}

func TestRemoveAllRefusesOutside(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	victim := filepath.Join(outside, "keep")
	if err := os.WriteFile(victim, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{outside, root, filepath.Join(root, "..", filepath.Base(outside))} {
		if err := RemoveAll(root, p); err == nil {
			t.Errorf("RemoveAll(%q, %q) succeeded, want a refusal", root, p)
		}
	}
	if _, err := os.Stat(victim); err != nil {
		t.Fatalf("a refused removal removed %s: %v", victim, err)
	}
	in := filepath.Join(root, "vm", "disk")
	if err := os.MkdirAll(in, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := RemoveAll(root, filepath.Join(root, "vm")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(in); !os.IsNotExist(err) {
		t.Fatalf("RemoveAll left %s: %v", in, err)
	}
	if err := RemoveAll(root, filepath.Join(root, "gone")); err != nil {
		t.Fatalf("RemoveAll of a missing path: %v", err)
	}
}

func TestRebase(t *testing.T) {
	if got := Rebase("/k/.new-x/vmlinuz", "/k/.new-x", "/k/x"); got != "/k/x/vmlinuz" {
		t.Errorf("Rebase inside = %q", got)
	}
	if got := Rebase("/elsewhere/vmlinuz", "/k/.new-x", "/k/x"); got != "/elsewhere/vmlinuz" {
		t.Errorf("Rebase outside = %q", got)
	}
}
