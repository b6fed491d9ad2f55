package mounts

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/pkg/sftp"
	"golang.org/x/sys/unix"
)

// The test binary doubles as the mount server: Launcher runs it with
// BANGER_TEST_MOUNT_SERVER=1.
func TestMain(m *testing.M) {
	if os.Getenv("BANGER_TEST_MOUNT_SERVER") == "1" {
		os.Exit(ServerMain(os.Args[1:], os.Stderr))
	}
	os.Exit(m.Run())
}

// nobody is the unprivileged caller every access test runs as.
var nobody = Caller{UID: 65534, GID: 65534}

// world is a test tree in a world-traversable temp dir:
//
//	base/            0755 root
//	base/server      a copy of the test binary (the go-build dir is 0700)
//	base/secret      0644 root: outside every shared folder
//	base/private/    0700 root
//	base/rootdir/    0755 root (readable, not writable, by nobody)
//	base/share/      0755 nobody: the shared folder
//	  hello.txt      "hello from the host"
//	  escape       → ../secret
//	  abs          → /etc
//	  inside       → hello.txt
//	base/to-root   → /root
type world struct {
	base, share string
	launcher    Launcher
}

func newWorld(t *testing.T) *world {
	t.Helper()
	testutil.RequiresRoot(t)
	base, err := os.MkdirTemp("", "banger-mounts-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Chmod(base, 0o755))
	exe, err := os.ReadFile(os.Args[0])
	must(err)
	must(os.WriteFile(filepath.Join(base, "server"), exe, 0o755))
	must(os.WriteFile(filepath.Join(base, "secret"), []byte("host secret"), 0o644))
	must(os.Mkdir(filepath.Join(base, "private"), 0o700))
	must(os.Mkdir(filepath.Join(base, "rootdir"), 0o755))
	share := filepath.Join(base, "share")
	must(os.Mkdir(share, 0o755))
	must(os.WriteFile(filepath.Join(share, "hello.txt"), []byte("hello from the host"), 0o644))
	must(os.Symlink("../secret", filepath.Join(share, "escape")))
	must(os.Symlink("/etc", filepath.Join(share, "abs")))
	must(os.Symlink("hello.txt", filepath.Join(share, "inside")))
	must(os.Symlink("/root", filepath.Join(base, "to-root")))
	must(filepath.Walk(share, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, 65534, 65534)
	}))
	return &world{base: base, share: share, launcher: Launcher{
		Command: []string{filepath.Join(base, "server")},
		Env:     []string{"BANGER_TEST_MOUNT_SERVER=1"},
	}}
}

// serve starts a mount server for s as caller and returns an SFTP client
// on it, as the guest side would have.
func (w *world) serve(t *testing.T, caller Caller, s Spec) (*sftp.Client, *Process) {
	t.Helper()
	host, guest := net.Pipe()
	var stderr bytes.Buffer
	p, err := w.launcher.Start(context.Background(), caller, s, host, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = p.Stop()
		if stderr.Len() > 0 {
			t.Logf("mount server stderr: %s", stderr.String())
		}
	})
	c, err := sftp.NewClientPipe(guest, guest)
	if err != nil {
		t.Fatalf("sftp session with the mount server: %v (stderr %q)", err, stderr.String())
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, p
}

func wantErrno(t *testing.T, what string, err error, want syscall.Errno) {
	t.Helper()
	if got := toErrno(err); got != want {
		t.Errorf("%s: error %v maps to %v (%d); want %v (%d)", what, err, got, int(got), want, int(want))
	}
}

func owner(t *testing.T, p string) (uint32, uint32) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Uid, st.Gid
}

func TestServerReadWriteAsCaller(t *testing.T) {
	w := newWorld(t)
	c, p := w.serve(t, nobody, Spec{HostDir: w.share, GuestDir: "/src"})
	// The server runs as the caller, not root.
	if uid, _ := owner(t, filepath.Join("/proc", itoa(p.Pid()))); uid != nobody.UID {
		t.Errorf("mount server runs as uid %d, want %d", uid, nobody.UID)
	}
	f, err := c.Open("/hello.txt")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(f)
	_ = f.Close()
	if string(b) != "hello from the host" {
		t.Errorf("read hello.txt = %q", b)
	}
	// Files and directories the guest makes belong to the caller.
	if err := c.Mkdir("/dir"); err != nil {
		t.Fatal(err)
	}
	nf, err := c.Create("/dir/new.txt")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nf.Write([]byte("from the guest")); err != nil {
		t.Fatal(err)
	}
	_ = nf.Close()
	got, err := os.ReadFile(filepath.Join(w.share, "dir/new.txt"))
	if err != nil || string(got) != "from the guest" {
		t.Errorf("host sees dir/new.txt = %q, %v", got, err)
	}
	for _, p := range []string{"dir", "dir/new.txt"} {
		if uid, gid := owner(t, filepath.Join(w.share, p)); uid != 65534 || gid != 65534 {
			t.Errorf("host owner of %s = %d:%d, want 65534:65534 (the caller)", p, uid, gid)
		}
	}
	// Symlinks inside the folder work; errno values survive the trip.
	if err := c.Symlink("new.txt", "/dir/link"); err != nil {
		t.Fatal(err)
	}
	if target, err := c.ReadLink("/dir/link"); err != nil || target != "new.txt" {
		t.Errorf("readlink dir/link = %q, %v", target, err)
	}
	if fi, err := c.Stat("/inside"); err != nil || fi.Size() != int64(len("hello from the host")) {
		t.Errorf("stat through an in-folder symlink: %v, %v", fi, err)
	}
	wantErrno(t, "mkdir of an existing dir", c.Mkdir("/dir"), syscall.EEXIST)
	wantErrno(t, "rmdir of a non-empty dir", c.RemoveDirectory("/dir"), syscall.ENOTEMPTY)
	wantErrno(t, "rename onto an existing file without replace", c.Rename("/hello.txt", "/dir/new.txt"), syscall.EEXIST)
	if err := c.PosixRename("/dir/new.txt", "/renamed.txt"); err != nil {
		t.Errorf("posix rename: %v", err)
	}
	if err := c.Chmod("/renamed.txt", 0o600); err != nil {
		t.Errorf("chmod: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(w.share, "renamed.txt")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("host mode after chmod = %v, %v; want 0600", fi, err)
	}
	if err := c.Truncate("/renamed.txt", 4); err != nil {
		t.Errorf("truncate: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(w.share, "renamed.txt")); string(b) != "from" {
		t.Errorf("after truncate to 4: %q", b)
	}
	// A caller cannot give files away.
	wantErrno(t, "chown to root", c.Chown("/renamed.txt", 0, 0), syscall.EPERM)
}

func TestServerReadOnly(t *testing.T) {
	w := newWorld(t)
	c, _ := w.serve(t, nobody, Spec{HostDir: w.share, GuestDir: "/src", ReadOnly: true})
	if _, err := c.Stat("/hello.txt"); err != nil {
		t.Fatalf("stat on a read-only mount: %v", err)
	}
	_, err := c.Create("/new.txt")
	wantErrno(t, "create", err, syscall.EROFS)
	_, err = c.OpenFile("/hello.txt", os.O_WRONLY)
	wantErrno(t, "open for writing", err, syscall.EROFS)
	wantErrno(t, "mkdir", c.Mkdir("/d"), syscall.EROFS)
	wantErrno(t, "remove", c.Remove("/hello.txt"), syscall.EROFS)
	wantErrno(t, "rename", c.PosixRename("/hello.txt", "/x"), syscall.EROFS)
	wantErrno(t, "chmod", c.Chmod("/hello.txt", 0o777), syscall.EROFS)
	wantErrno(t, "symlink", c.Symlink("x", "/l"), syscall.EROFS)
	if b, _ := os.ReadFile(filepath.Join(w.share, "hello.txt")); string(b) != "hello from the host" {
		t.Errorf("hello.txt changed on a read-only mount: %q", b)
	}
}

// Nothing the guest sends reaches outside the folder: not "..", not a
// symlink pointing out (relative or absolute), not a rename or link into
// such a symlink.
func TestServerEscapesRefused(t *testing.T) {
	w := newWorld(t)
	c, _ := w.serve(t, nobody, Spec{HostDir: w.share, GuestDir: "/src"})
	for _, p := range []string{"../secret", "/../secret", "../../../../etc/passwd", "dir/../../secret"} {
		if f, err := c.Open(p); err == nil {
			b, _ := io.ReadAll(f)
			_ = f.Close()
			t.Errorf("open %q read %q: a path outside the folder was served", p, b)
		}
	}
	_, err := c.Open("/escape")
	wantErrno(t, "open of a symlink to ../secret", err, syscall.EACCES)
	_, err = c.Open("/abs/passwd")
	wantErrno(t, "open through a symlink to /etc", err, syscall.EACCES)
	_, err = c.Stat("/abs/passwd")
	wantErrno(t, "stat through a symlink to /etc", err, syscall.EACCES)
	_, err = c.Create("/abs/planted")
	wantErrno(t, "create through a symlink to /etc", err, syscall.EACCES)
	_, err = c.OpenFile("/escape", os.O_WRONLY|os.O_TRUNC)
	wantErrno(t, "truncating open of a symlink pointing out", err, syscall.EACCES)
	wantErrno(t, "chmod of a symlink pointing out", c.Chmod("/escape", 0o777), syscall.EACCES)
	wantErrno(t, "rename into a symlink to /etc", c.PosixRename("/hello.txt", "/abs/moved"), syscall.EACCES)
	wantErrno(t, "mkdir through a symlink to /etc", c.Mkdir("/abs/d"), syscall.EACCES)
	if _, err := c.ReadDir("/abs"); err == nil {
		t.Error("listing a symlink to /etc succeeded")
	}
	// The symlinks themselves are visible as symlinks, with their text.
	if target, err := c.ReadLink("/abs"); err != nil || target != "/etc" {
		t.Errorf("readlink abs = %q, %v; want /etc", target, err)
	}
	if fi, err := c.Lstat("/escape"); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("lstat escape = %v, %v; want a symlink", fi, err)
	}
	if b, _ := os.ReadFile(filepath.Join(w.base, "secret")); string(b) != "host secret" {
		t.Errorf("the host file outside the folder changed: %q", b)
	}
	if _, err := os.Lstat("/etc/planted"); err == nil {
		t.Error("a file was planted in /etc")
	}
}

// The resolution itself refuses "..": a request that bypassed the SFTP
// layer's path cleaning still stays inside.
func TestRootResolveBeneath(t *testing.T) {
	w := newWorld(t)
	r, err := OpenRoot(w.share, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, p := range []string{"../secret", "escape", "abs/passwd", "/etc/passwd"} {
		if fd, err := r.openat2(p, unix.O_RDONLY, 0); err == nil {
			_ = unix.Close(fd)
			t.Errorf("openat2 beneath the folder of %q succeeded", p)
		}
	}
	if fd, err := r.openat2("inside", unix.O_RDONLY, 0); err != nil {
		t.Errorf("openat2 of an in-folder symlink: %v", err)
	} else {
		_ = unix.Close(fd)
	}
}

func TestCheckCallerAccess(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		spec Spec
		ok   bool
	}{
		{"own folder rw", Spec{HostDir: w.share}, true},
		{"own folder ro", Spec{HostDir: w.share, ReadOnly: true}, true},
		{"root's 0700 folder", Spec{HostDir: filepath.Join(w.base, "private"), ReadOnly: true}, false},
		{"symlink to /root", Spec{HostDir: filepath.Join(w.base, "to-root"), ReadOnly: true}, false},
		{"readable, not writable, ro", Spec{HostDir: filepath.Join(w.base, "rootdir"), ReadOnly: true}, true},
		{"readable, not writable, rw", Spec{HostDir: filepath.Join(w.base, "rootdir")}, false},
		{"missing", Spec{HostDir: filepath.Join(w.base, "nope")}, false},
		{"a file", Spec{HostDir: filepath.Join(w.base, "secret"), ReadOnly: true}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.spec.GuestDir = "/mnt"
			err := w.launcher.Check(ctx, nobody, tc.spec)
			if tc.ok && err != nil {
				t.Errorf("Check(%v) as uid 65534: %v; want ok", tc.spec, err)
			}
			if !tc.ok && !errors.Is(err, ErrAccess) {
				t.Errorf("Check(%v) as uid 65534: %v; want ErrAccess", tc.spec, err)
			}
			if err != nil {
				t.Logf("refusal: %v", err)
			}
		})
	}
	// Root may mount root's folders: the check is the caller's, not a ban.
	if err := w.launcher.Check(ctx, Caller{}, Spec{HostDir: filepath.Join(w.base, "to-root"), GuestDir: "/mnt"}); err != nil {
		t.Errorf("Check of /root as root: %v", err)
	}
	// A session for a refused folder never starts serving.
	host, guest := net.Pipe()
	defer guest.Close()
	p, err := w.launcher.Start(ctx, nobody, Spec{HostDir: filepath.Join(w.base, "private"), GuestDir: "/mnt"}, host, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(); err == nil {
		t.Error("a mount server for a folder the caller cannot read exited 0")
	}
}

// A folder deleted while mounted gives I/O errors, not a crash.
func TestServerFolderDeleted(t *testing.T) {
	w := newWorld(t)
	c, p := w.serve(t, nobody, Spec{HostDir: w.share, GuestDir: "/src"})
	if _, err := c.Stat("/hello.txt"); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(w.share); err != nil {
		t.Fatal(err)
	}
	_, err := c.Stat("/hello.txt")
	wantErrno(t, "stat after the folder was deleted", err, syscall.EIO)
	_, err = c.Create("/new")
	wantErrno(t, "create after the folder was deleted", err, syscall.EIO)
	_, err = c.ReadDir("/")
	if err == nil {
		t.Error("listing a deleted folder succeeded")
	}
	select {
	case <-p.done:
		t.Fatalf("the mount server died: %v", p.err)
	default:
	}
}

func itoa(n int) string { return string(appendInt(nil, n)) }

func appendInt(b []byte, n int) []byte {
	if n >= 10 {
		b = appendInt(b, n/10)
	}
	return append(b, byte('0'+n%10))
}
