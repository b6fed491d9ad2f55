package e2etest

import (
	"os"
	"path/filepath"
	"testing"
)

func TestRunOf(t *testing.T) {
	tests := []struct{ path, want string }{
		{"/tmp/banger-e2e/0123abcd/tmp/x", "0123abcd"},
		{"/tmp/banger-e2e/0123abcd", "0123abcd"},
		{"/tmp/banger-e2e/0123abcd/", "0123abcd"},
		{"/tmp/banger-e2e/0123ABCD/x", ""},
		{"/tmp/banger-e2e/0123abc/x", ""},
		{"/tmp/banger-e2e/../etc/x", ""},
		{"/tmp/banger-e2ex/0123abcd/x", ""},
		{"/var/lib/banger/0123abcd/x", ""},
	}
	for _, tt := range tests {
		if got := runOf("/tmp/banger-e2e", tt.path); got != tt.want {
			t.Errorf("runOf(%q) = %q, want %q", tt.path, got, tt.want)
		}
	}
}

func TestNetnsNames(t *testing.T) {
	for name, want := range map[string]string{
		"bgr-e2e-0123abcd-1":  "0123abcd",
		"bgr-e2e-0123abcd-12": "0123abcd",
		"bgr-e2e-0123abcd":    "", // the old harness's names carry no run id
		"bgr-e2e-0123abcd-x":  "",
		"bgr-harness-1":       "",
	} {
		got := ""
		if m := netnsRE.FindStringSubmatch(name); m != nil {
			got = m[1]
		}
		if got != want {
			t.Errorf("run id of netns %q = %q, want %q", name, got, want)
		}
	}
}

// TestRunAlive: a run is alive only while its owner record names this very
// process (pid and start time) on this boot.
func TestRunAlive(t *testing.T) {
	root := t.TempDir()
	me, err := self()
	if err != nil {
		t.Fatal(err)
	}
	write := func(id, owner string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(root, id), 0o700); err != nil {
			t.Fatal(err)
		}
		if owner != "" {
			if err := os.WriteFile(filepath.Join(root, id, "owner"), []byte(owner), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	reused := me
	reused.Start++
	otherBoot := me
	otherBoot.BootID = "00000000-0000-0000-0000-000000000000"
	write("0000000a", me.String())
	write("0000000b", reused.String())
	write("0000000c", otherBoot.String())
	write("0000000d", "")
	write("0000000e", "garbage")
	for id, want := range map[string]bool{
		"0000000a": true,  // this process
		"0000000b": false, // the pid, but another process's start time: reused
		"0000000c": false, // another boot
		"0000000d": false, // no owner record
		"0000000e": false, // a record that does not parse
		"0000000f": false, // no run dir
		"../x":     false, // not a run id
	} {
		if got := runAlive(root, id); got != want {
			t.Errorf("runAlive(%s) = %v, want %v", id, got, want)
		}
	}
}
