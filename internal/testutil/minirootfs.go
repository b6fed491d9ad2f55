package testutil

import (
	"archive/tar"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// MiniRootfsTar writes a tiny root filesystem tar into dir and returns its
// path: an os-release naming Debian 12 (marker is its PRETTY_NAME, so two
// builds can differ), a "sshd" executable at /usr/sbin/sshd, a file owned
// by uid/gid 1000, a setuid file, a symlink, an SSH host key as package installation leaves one, and the directories a systemd
// guest has. It stands in for a Debian root filesystem wherever mkfs and
// debugfs must run but booting is not the point.
func MiniRootfsTar(t testing.TB, dir, marker string) string {
	t.Helper()
	p := filepath.Join(dir, "minirootfs.tar")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	mt := time.Unix(1700000000, 0)
	add := func(h *tar.Header, body string) {
		h.ModTime = mt
		h.Format = tar.FormatPAX
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if body != "" {
			if _, err := tw.Write([]byte(body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, d := range []string{"./", "./etc/", "./etc/systemd/", "./etc/systemd/system/", "./usr/", "./usr/lib/", "./usr/sbin/", "./usr/bin/", "./home/", "./home/dev/", "./var/", "./var/lib/", "./etc/ssh/"} {
		add(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755}, "")
	}
	add(&tar.Header{Name: "./usr/lib/os-release", Typeflag: tar.TypeReg, Mode: 0o644},
		"PRETTY_NAME=\"Debian GNU/Linux 12 ("+marker+")\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n")
	add(&tar.Header{Name: "./etc/os-release", Typeflag: tar.TypeSymlink, Linkname: "../usr/lib/os-release"}, "")
	add(&tar.Header{Name: "./usr/sbin/sshd", Typeflag: tar.TypeReg, Mode: 0o755}, "#!/bin/sh\nexit 0\n")
	add(&tar.Header{Name: "./etc/ssh/ssh_host_ed25519_key", Typeflag: tar.TypeReg, Mode: 0o600}, "baked-in private key\n")
	add(&tar.Header{Name: "./usr/bin/sudo", Typeflag: tar.TypeReg, Mode: 0o4755}, "not really sudo\n")
	add(&tar.Header{Name: "./home/dev/.profile", Typeflag: tar.TypeReg, Mode: 0o600, Uid: 1000, Gid: 1000}, "export EDITOR=vi\n")
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}
