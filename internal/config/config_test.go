package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaults(t *testing.T) {
	root := Defaults(0, "/root", "")
	if root.StateDir != "/var/lib/banger" || root.CacheDir != "/var/cache/banger" || root.RuntimeDir != "/run/banger" || root.Socket != "/run/banger/banger.sock" {
		t.Fatalf("root defaults: %+v", root)
	}
	u := Defaults(1000, "/home/a", "/run/user/1000")
	if u.StateDir != "/home/a/.local/state/banger" || u.CacheDir != "/home/a/.cache/banger" || u.RuntimeDir != "/run/user/1000/banger" {
		t.Fatalf("user defaults: %+v", u)
	}
	if err := root.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "c.json")
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	c := Defaults(0, "", "")
	if err := Load(&c, write(`{"runtime_dir": "/tmp/r", "healthy_timeout": "90s", "vmm": "qemu"}`), true); err != nil {
		t.Fatal(err)
	}
	if c.RuntimeDir != "/tmp/r" || c.Socket != "/tmp/r/banger.sock" || time.Duration(c.HealthyTimeout) != 90*time.Second || c.VMM != "qemu" {
		t.Fatalf("loaded: %+v", c)
	}
	c = Defaults(0, "", "")
	if err := Load(&c, write(`{"stat_dir": "/x"}`), true); err == nil || !strings.Contains(err.Error(), "stat_dir") {
		t.Fatalf("a typo'd key must be an error naming it, got %v", err)
	}
	if err := Load(&c, filepath.Join(dir, "missing.json"), false); err != nil {
		t.Fatalf("a missing optional config file: %v", err)
	}
	if err := Load(&c, filepath.Join(dir, "missing.json"), true); err == nil {
		t.Fatal("a missing --config file must be an error")
	}
	for _, bad := range []Config{
		func() Config { c := Defaults(0, "", ""); c.StateDir = "rel"; return c }(),
		func() Config { c := Defaults(0, "", ""); c.DiskDriver = "zfs"; return c }(),
		func() Config { c := Defaults(0, "", ""); c.VMM = "xen"; return c }(),
		func() Config { c := Defaults(0, "", ""); c.ReadyCheck = "ping"; return c }(),
	} {
		if err := bad.Validate(); err == nil {
			t.Errorf("Validate accepted %+v", bad)
		}
	}
}
