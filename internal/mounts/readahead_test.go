package mounts

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMountDevice(t *testing.T) {
	mi := []byte(`22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
35 22 0:30 / /mnt/src rw,nosuid,nodev,relatime - fuse.banger banger rw,user_id=0,group_id=0
36 22 0:31 / /mnt/with\040space rw - fuse.banger banger rw
37 35 0:32 / /mnt/src rw - fuse.banger banger rw
`)
	for _, tc := range []struct{ dir, want string }{
		{"/mnt/src", "0:32"}, // the latest mount there
		{"/mnt/src/", "0:32"},
		{"/mnt/with space", "0:31"},
		{"/", "0:21"},
		{"/mnt/none", ""},
	} {
		if got := mountDevice(mi, tc.dir); got != tc.want {
			t.Errorf("mountDevice(%q) = %q, want %q", tc.dir, got, tc.want)
		}
	}
}

func TestSetReadAhead(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"proc/self", "sys/class/bdi/0:30"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mi := "35 22 0:30 / /mnt/src rw - fuse.banger banger rw\n"
	if err := os.WriteFile(filepath.Join(root, "proc/self/mountinfo"), []byte(mi), 0o644); err != nil {
		t.Fatal(err)
	}
	ra := filepath.Join(root, "sys/class/bdi/0:30/read_ahead_kb")
	if err := os.WriteFile(ra, []byte("128\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := setReadAhead(root, "/mnt/src"); err != nil {
		t.Fatalf("setReadAhead: %v", err)
	}
	if b, _ := os.ReadFile(ra); string(b) != "1024" {
		t.Errorf("read_ahead_kb = %q, want 1024", b)
	}
	if err := setReadAhead(root, "/mnt/other"); err == nil {
		t.Error("setReadAhead of a folder that is not mounted: no error")
	}
}

func TestIsDevNumber(t *testing.T) {
	for s, want := range map[string]bool{"0:52": true, "259:0": true, "": false, "0:": false, ":1": false, "../../x": false, "0:52/../..": false, "a:b": false} {
		if got := isDevNumber(s); got != want {
			t.Errorf("isDevNumber(%q) = %v, want %v", s, got, want)
		}
	}
}
