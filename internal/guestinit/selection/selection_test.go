package selection

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/guestabi"
)

// layout builds an image root: "f:path" an executable file, "n:path" a
// non-executable file, "d:path" a directory, "l:path=target" a link.
func layout(t *testing.T, root string, entries ...string) {
	t.Helper()
	for _, e := range entries {
		kind, spec, _ := strings.Cut(e, ":")
		p, target, _ := strings.Cut(spec, "=")
		host := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(host), 0o755); err != nil {
			t.Fatal(err)
		}
		var err error
		switch kind {
		case "f":
			err = os.WriteFile(host, []byte("#!/bin/sh\n"), 0o755)
		case "n":
			err = os.WriteFile(host, []byte("data"), 0o644)
		case "d":
			err = os.MkdirAll(host, 0o755)
		case "l":
			err = os.Symlink(target, host)
		default:
			t.Fatalf("bad layout entry %q", e)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestChoose(t *testing.T) {
	outside := t.TempDir()
	layout(t, outside, "f:lib/systemd/systemd", "f:sbin/init")
	hostSystemd := filepath.Join(outside, "lib/systemd/systemd")
	bangerInit := "l:" + strings.TrimPrefix(guestabi.InitPath, "/") + "=" + guestabi.AgentPath
	agent := "f:" + strings.TrimPrefix(guestabi.AgentPath, "/")

	for _, tc := range []struct {
		name    string
		entries []string
		choice  guestabi.Init
		init    string // init= on the command line
		want    guestabi.Init
		path    string
		reason  string // a word the reason must hold
	}{
		{name: "absolute link to systemd", entries: []string{"f:lib/systemd/systemd", "l:sbin/init=/lib/systemd/systemd", agent, bangerInit},
			want: guestabi.InitImage, path: SbinInit, reason: "/lib/systemd/systemd (systemd)"},
		{name: "merged /usr, relative links", entries: []string{"f:usr/lib/systemd/systemd", "l:lib=usr/lib", "l:sbin=usr/sbin", "l:usr/sbin/init=../lib/systemd/systemd", agent, bangerInit},
			want: guestabi.InitImage, path: SbinInit, reason: "/usr/lib/systemd/systemd"},
		{name: "link through .. past the root", entries: []string{"f:lib/systemd/systemd", "l:sbin/init=../../../../lib/systemd/systemd", agent, bangerInit},
			want: guestabi.InitImage, path: SbinInit, reason: "systemd"},
		{name: "no /sbin/init but systemd", entries: []string{"f:lib/systemd/systemd", agent, bangerInit},
			want: guestabi.InitImage, path: SbinInit, reason: "missing"},
		{name: "busybox", entries: []string{"f:bin/busybox", "l:sbin/init=../bin/busybox", "l:bin/sh=busybox", agent, bangerInit},
			want: guestabi.InitBanger, path: guestabi.InitPath, reason: "/bin/busybox, not systemd"},
		{name: "sysvinit file", entries: []string{"f:sbin/init", agent, bangerInit},
			want: guestabi.InitBanger, path: guestabi.InitPath, reason: "not systemd"},
		{name: "scratch", entries: []string{"f:app", agent, bangerInit},
			want: guestabi.InitBanger, path: guestabi.InitPath, reason: "no /sbin/init"},
		{name: "link loop", entries: []string{"l:sbin/init=/sbin/init2", "l:sbin/init2=init", "f:lib/systemd/systemd.not", agent, bangerInit},
			want: guestabi.InitBanger, path: guestabi.InitPath, reason: "too many levels"},
		{name: "absolute link out of the image", entries: []string{"l:sbin/init=" + hostSystemd, agent, bangerInit},
			want: guestabi.InitBanger, path: guestabi.InitPath, reason: "no /sbin/init"},
		{name: "relative link out of the image", entries: []string{"l:sbin/init=" + strings.Repeat("../", 30) + strings.TrimPrefix(hostSystemd, "/"), agent, bangerInit},
			want: guestabi.InitBanger, path: guestabi.InitPath, reason: "no /sbin/init"},
		{name: "systemd not executable", entries: []string{"n:lib/systemd/systemd", "l:sbin/init=/lib/systemd/systemd", agent, bangerInit},
			want: guestabi.InitBanger, path: guestabi.InitPath, reason: "not systemd"},
		{name: "file used as a directory", entries: []string{"f:sbin", agent, bangerInit},
			want: guestabi.InitBanger, path: guestabi.InitPath, reason: "not a directory"},
		{name: "banger asked on systemd", entries: []string{"f:lib/systemd/systemd", "l:sbin/init=/lib/systemd/systemd", agent, bangerInit},
			choice: guestabi.InitBanger, want: guestabi.InitBanger, path: guestabi.InitPath, reason: "asked"},
		{name: "image asked on busybox", entries: []string{"f:bin/busybox", "l:sbin/init=/bin/busybox", agent, bangerInit},
			choice: guestabi.InitImage, want: guestabi.InitImage, path: SbinInit, reason: "asked"},
		{name: "init= given", entries: []string{"f:bin/sh", agent, bangerInit}, init: "/bin/sh",
			want: guestabi.InitImage, path: "/bin/sh", reason: "init=/bin/sh"},
		{name: "older image without banger's init", entries: []string{"f:bin/busybox", "l:sbin/init=/bin/busybox"},
			want: guestabi.InitImage, path: SbinInit, reason: "older banger"},
		{name: "banger asked, older image", entries: []string{"f:bin/busybox", "l:sbin/init=/bin/busybox"},
			choice: guestabi.InitBanger, want: guestabi.InitImage, path: SbinInit, reason: "older banger"},
		{name: "banger's init a dangling link", entries: []string{"f:bin/busybox", "l:sbin/init=/bin/busybox", bangerInit},
			want: guestabi.InitImage, path: SbinInit, reason: "older banger"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			layout(t, root, tc.entries...)
			got, err := Choose(root, tc.choice, tc.init)
			if err != nil {
				t.Fatalf("Choose: %v", err)
			}
			if got.Init != tc.want || got.Path != tc.path || !strings.Contains(got.Reason, tc.reason) {
				t.Errorf("Choose(%v, %q, %q) = %+v, want init %q path %q, reason holding %q", tc.entries, tc.choice, tc.init, got, tc.want, tc.path, tc.reason)
			}
		})
	}
}

func TestChooseMissingRoot(t *testing.T) {
	if _, err := Choose(filepath.Join(t.TempDir(), "nope"), guestabi.InitAuto, ""); err == nil {
		t.Errorf("Choose on a missing root succeeded")
	}
}

func TestResolve(t *testing.T) {
	root := t.TempDir()
	layout(t, root, "f:usr/bin/busybox", "l:bin=usr/bin", "l:usr/bin/sh=./busybox", "l:a=b", "l:b=a", "l:dangling=/nowhere",
		"d:etc", "l:etc/self=.", "l:up=../../..")
	for _, tc := range []struct {
		in, want string
		err      error
	}{
		{"/bin/sh", "/usr/bin/busybox", nil},
		{"/etc/self/self/self", "/etc", nil},
		{"/up/usr/bin", "/usr/bin", nil},
		{"/../../bin/sh", "/usr/bin/busybox", nil},
		{"/a", "", ErrLoop},
		{"/dangling", "", fs.ErrNotExist},
		{"/usr/bin/busybox/x", "", fs.ErrInvalid},
		{"relative", "", fs.ErrInvalid},
	} {
		got, err := Resolve(root, tc.in)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("Resolve(%q) = %q, %v; want %v", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("Resolve(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}
