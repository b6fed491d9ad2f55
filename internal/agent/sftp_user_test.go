package agent

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

// sftpServerArg makes the test binary banger's sftp-server (as the guest
// program's "sftp-server" argument does), see TestMain.
const sftpServerArg = "sftp-server"

// TestSFTPAsLoginUser: the sftp subsystem of a login as a user other than
// root runs as that user (a child with the user's uid and gids, serving
// SFTP with ServeSFTP), so a file it creates is the user's, and a directory
// the user may not write refuses it. Root's runs in process, as root.
func TestSFTPAsLoginUser(t *testing.T) {
	testutil.RequiresRoot(t)
	c, _, srv := muxServer(t)
	// The child runs as uid 65534: give it a copy of the test binary it
	// can reach (go test's build dir is 0700).
	work, err := os.MkdirTemp("/tmp", "banger-sftp-user-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(work) })
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(work, "agent.test")
	copyFile(t, self, bin, 0o755)
	srv.SFTPServer = []string{bin, sftpServerArg}
	open, closed := filepath.Join(work, "open"), filepath.Join(work, "closed")
	for _, d := range []struct {
		path string
		mode os.FileMode
	}{{work, 0o755}, {open, 0o777}, {closed, 0o755}} {
		if err := os.MkdirAll(d.path, d.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d.path, d.mode); err != nil {
			t.Fatal(err)
		}
	}
	signer, err := ssh.ParsePrivateKey(testPrivateKey(t, srv))
	if err != nil {
		t.Fatal(err)
	}

	login := func(user string) *sftp.Client {
		t.Helper()
		st, err := c.OpenStream(ctxTimeout(t, 10*time.Second), Request{Op: OpSSH})
		if err != nil {
			t.Fatal(err)
		}
		sc, chans, reqs, err := ssh.NewClientConn(st, "vm", &ssh.ClientConfig{
			User: user, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
			HostKeyCallback: ssh.InsecureIgnoreHostKey(), //nolint:gosec // the key is this test's own server's
			Timeout:         10 * time.Second,
		})
		if err != nil {
			t.Fatalf("ssh as %s: %v", user, err)
		}
		cl := ssh.NewClient(sc, chans, reqs)
		t.Cleanup(func() { _ = cl.Close() })
		fc, err := sftp.NewClient(cl)
		if err != nil {
			t.Fatalf("sftp as %s: %v", user, err)
		}
		t.Cleanup(func() { _ = fc.Close() })
		return fc
	}
	put := func(fc *sftp.Client, p string) error {
		f, err := fc.Create(p)
		if err != nil {
			return err
		}
		if _, err := f.Write([]byte("via sftp")); err != nil {
			_ = f.Close()
			return err
		}
		return f.Close()
	}
	owner := func(p string) (uint32, uint32) {
		t.Helper()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		return st.Uid, st.Gid
	}

	nobody := login("nobody")
	if err := put(nobody, filepath.Join(open, "by-nobody")); err != nil {
		t.Fatalf("sftp put as nobody into a 0777 dir: %v", err)
	}
	if uid, gid := owner(filepath.Join(open, "by-nobody")); uid != 65534 || gid != 65534 {
		t.Errorf("file created through sftp as nobody is owned by %d:%d, want 65534:65534", uid, gid)
	}
	if err := nobody.Mkdir(filepath.Join(open, "dir-by-nobody")); err != nil {
		t.Errorf("sftp mkdir as nobody: %v", err)
	} else if uid, _ := owner(filepath.Join(open, "dir-by-nobody")); uid != 65534 {
		t.Errorf("dir made through sftp as nobody is owned by uid %d, want 65534", uid)
	}
	err = put(nobody, filepath.Join(closed, "by-nobody"))
	if !errors.Is(err, fs.ErrPermission) {
		t.Errorf("sftp put as nobody into root's 0755 dir: %v; want permission denied", err)
	}
	if _, err := os.Lstat(filepath.Join(closed, "by-nobody")); err == nil {
		t.Error("nobody created a file in root's 0755 dir through sftp")
	}

	root := login("root")
	if err := put(root, filepath.Join(closed, "by-root")); err != nil {
		t.Fatalf("sftp put as root: %v", err)
	}
	if uid, _ := owner(filepath.Join(closed, "by-root")); uid != 0 {
		t.Errorf("file created through sftp as root is owned by uid %d", uid)
	}
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(src) //nolint:gosec // the test binary
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode) //nolint:gosec // a test dir
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
