package imagepull

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/bangerdev/banger/internal/guestabi"
)

func TestRunConfig(t *testing.T) {
	cf := &v1.ConfigFile{Config: v1.Config{
		Entrypoint: []string{"/docker-entrypoint.sh"}, Cmd: []string{"nginx", "-g", "daemon off;"},
		Env: []string{"PATH=/usr/bin", "NGINX_VERSION=1.27"}, WorkingDir: "/srv", User: "101:101",
		ExposedPorts: map[string]struct{}{"80/tcp": {}, "443/tcp": {}}, Labels: map[string]string{"x": "y"},
	}}
	want := guestabi.ImageConfig{Entrypoint: []string{"/docker-entrypoint.sh"}, Cmd: []string{"nginx", "-g", "daemon off;"},
		Env: []string{"PATH=/usr/bin", "NGINX_VERSION=1.27"}, WorkingDir: "/srv", User: "101:101", ExposedPorts: []string{"443/tcp", "80/tcp"}}
	if diff := cmp.Diff(want, runConfig(cf)); diff != "" {
		t.Errorf("runConfig (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(guestabi.ImageConfig{}, runConfig(nil)); diff != "" {
		t.Errorf("runConfig(nil) (-want +got):\n%s", diff)
	}
}

func TestInspectGuest(t *testing.T) {
	mk := func(t *testing.T, links map[string]string, files ...string) string {
		root := t.TempDir()
		for _, f := range files {
			p := filepath.Join(root, f)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, nil, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		for l, target := range links {
			p := filepath.Join(root, l)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
		}
		return root
	}
	for _, tc := range []struct {
		name  string
		root  string
		want  GuestFacts
		notes []string
	}{
		{"systemd debian", mk(t, map[string]string{"sbin/init": "/lib/systemd/systemd", "bin/sh": "dash"}, "lib/systemd/systemd", "bin/dash", "usr/sbin/sshd"),
			GuestFacts{Init: guestabi.InitImage, Shell: true, SSHD: true}, []string{"own init (systemd)"}},
		{"systemd debian, sshd enabled with its key", mk(t, map[string]string{"sbin/init": "/lib/systemd/systemd", "bin/sh": "dash",
			"etc/systemd/system/multi-user.target.wants/ssh.service": "/lib/systemd/system/ssh.service"},
			"lib/systemd/systemd", "bin/dash", "usr/sbin/sshd", "lib/systemd/system/ssh.service", "etc/ssh/ssh_host_ed25519_key"),
			GuestFacts{Init: guestabi.InitImage, Shell: true, SSHD: true, SSHDReady: true}, []string{"own init (systemd)"}},
		{"busybox", mk(t, map[string]string{"sbin/init": "../bin/busybox", "bin/sh": "busybox"}, "bin/busybox"),
			GuestFacts{Init: guestabi.InitBanger, Shell: true}, []string{"banger's init", "no sshd"}},
		{"scratch", mk(t, nil, "app"),
			GuestFacts{Init: guestabi.InitBanger}, []string{"banger's init", "no shell", "agent's SSH server"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := InspectGuest(tc.root)
			got.Reason = ""
			if got != tc.want {
				t.Errorf("InspectGuest = %+v, want %+v", got, tc.want)
			}
			notes := strings.Join(InspectGuest(tc.root).Notes(), "\n")
			for _, n := range tc.notes {
				if !strings.Contains(notes, n) {
					t.Errorf("notes %q lack %q", notes, n)
				}
			}
		})
	}
}
