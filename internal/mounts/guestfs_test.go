package mounts

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
)

// requireFUSE stops the test (a failure where the root tier is required)
// when this host has no /dev/fuse.
func requireFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testutil.Missing(t, testutil.TierRoot, "no /dev/fuse on this host: "+err.Error())
	}
}

// mountGuest mounts the world's share through a real mount server (as
// nobody) and a real FUSE mount on this host: the guest-side code running
// against the host kernel, as it runs in a guest.
func (w *world) mountGuest(t *testing.T, s Spec) string {
	t.Helper()
	mnt, _ := w.mountGuestProc(t, s)
	return mnt
}

// mountGuestProc is mountGuest, also returning the mount server.
func (w *world) mountGuestProc(t *testing.T, s Spec) (string, *Process) {
	t.Helper()
	requireFUSE(t)
	mnt := filepath.Join(w.base, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	host, guest, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	p, err := w.launcher.Start(t.Context(), nobody, s, host, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	m, err := MountGuest(guest, mnt, GuestOptions{ReadOnly: s.ReadOnly, CacheTimeout: 100 * time.Millisecond})
	if err != nil {
		_ = p.Stop()
		t.Fatalf("MountGuest: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
			_ = syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
		_ = p.Stop()
	})
	return mnt, p
}

func TestGuestFUSEReadWrite(t *testing.T) {
	w := newWorld(t)
	mnt := w.mountGuest(t, Spec{HostDir: w.share, GuestDir: "/src"})
	// Host → guest.
	if b, err := os.ReadFile(filepath.Join(mnt, "hello.txt")); err != nil || string(b) != "hello from the host" {
		t.Fatalf("guest reads hello.txt = %q, %v", b, err)
	}
	// Guest → host, a file large enough for many concurrent SFTP requests.
	big := make([]byte, 5<<20+123)
	_, _ = rand.Read(big)
	if err := os.MkdirAll(filepath.Join(mnt, "a/b/c"), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "a/b/c/big.bin"), big, 0o640); err != nil {
		t.Fatal(err)
	}
	hostPath := filepath.Join(w.share, "a/b/c/big.bin")
	if got, err := os.ReadFile(hostPath); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("host sees big.bin: %d bytes, %v; want the %d bytes written in the guest", len(got), err, len(big))
	}
	if fi, _ := os.Stat(hostPath); fi.Mode().Perm() != 0o640 {
		t.Errorf("host mode of big.bin = %v, want 0640", fi.Mode().Perm())
	}
	if fi, _ := os.Stat(filepath.Join(w.share, "a/b")); fi.Mode().Perm() != 0o750 {
		t.Errorf("host mode of a/b = %v, want 0750", fi.Mode().Perm())
	}
	// The guest wrote as root; the host files are the caller's.
	for _, p := range []string{"a", "a/b/c", "a/b/c/big.bin"} {
		if uid, gid := owner(t, filepath.Join(w.share, p)); uid != 65534 || gid != 65534 {
			t.Errorf("host owner of %s = %d:%d, want 65534:65534", p, uid, gid)
		}
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "a/b/c/big.bin")); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("guest reads back big.bin: %d bytes, %v", len(got), err)
	}
	// Host changes show in the guest once the cache expires.
	if err := os.WriteFile(filepath.Join(w.share, "later.txt"), []byte("later"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.share, "roots.txt"), []byte("root's"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(w.share, "later.txt"), 65534, 65534); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if b, err := os.ReadFile(filepath.Join(mnt, "later.txt")); err != nil || string(b) != "later" {
		t.Errorf("guest reads a file the host made: %q, %v", b, err)
	}
	// Host permissions are the caller's, whatever the guest user: a host
	// file of root's is not writable through the mount, though the guest
	// writes as root.
	if err := os.WriteFile(filepath.Join(mnt, "roots.txt"), []byte("x"), 0o644); !errors.Is(err, syscall.EACCES) {
		t.Errorf("guest write to a host file the caller may not write: %v; want EACCES", err)
	}
	// Renames, symlinks, truncation, removal, and the errno values tools need.
	if err := os.Rename(filepath.Join(mnt, "later.txt"), filepath.Join(mnt, "a/moved.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("moved.txt", filepath.Join(mnt, "a/link")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "a/link")); err != nil || string(b) != "later" {
		t.Errorf("read through a guest-made symlink: %q, %v", b, err)
	}
	if target, err := os.Readlink(filepath.Join(w.share, "a/link")); err != nil || target != "moved.txt" {
		t.Errorf("host readlink = %q, %v", target, err)
	}
	if err := os.Truncate(filepath.Join(mnt, "a/moved.txt"), 2); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(w.share, "a/moved.txt")); string(b) != "la" {
		t.Errorf("after truncate: %q", b)
	}
	f, err := os.OpenFile(filepath.Join(mnt, "a/moved.txt"), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if !errors.Is(err, syscall.EEXIST) {
		t.Errorf("O_EXCL create of an existing file: %v; want EEXIST", err)
	}
	if f != nil {
		_ = f.Close()
	}
	if err := os.Remove(filepath.Join(mnt, "a")); !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
		t.Errorf("rmdir of a non-empty dir: %v; want ENOTEMPTY", err)
	}
	if err := os.RemoveAll(filepath.Join(mnt, "a")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(w.share, "a")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("host still has a after guest rm -r: %v", err)
	}
	// A plain tool over the mount: ls -l and df.
	if out, err := exec.Command("ls", "-la", mnt).CombinedOutput(); err != nil {
		t.Errorf("ls -la: %v\n%s", err, out)
	}
	if out, err := exec.Command("df", mnt).CombinedOutput(); err != nil {
		t.Errorf("df: %v\n%s", err, out)
	}
}

func TestGuestFUSEReadOnly(t *testing.T) {
	w := newWorld(t)
	mnt := w.mountGuest(t, Spec{HostDir: w.share, GuestDir: "/src", ReadOnly: true})
	if b, err := os.ReadFile(filepath.Join(mnt, "hello.txt")); err != nil || string(b) != "hello from the host" {
		t.Fatalf("read on a read-only mount = %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "new.txt"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write on a read-only mount: %v; want EROFS", err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "hello.txt"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("overwrite on a read-only mount: %v; want EROFS", err)
	}
	if err := os.Mkdir(filepath.Join(mnt, "d"), 0o755); !errors.Is(err, syscall.EROFS) {
		t.Errorf("mkdir on a read-only mount: %v; want EROFS", err)
	}
}

func TestGuestFUSEFolderDeleted(t *testing.T) {
	w := newWorld(t)
	mnt := w.mountGuest(t, Spec{HostDir: w.share, GuestDir: "/src"})
	if _, err := os.Stat(filepath.Join(mnt, "hello.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(w.share); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the attribute cache
	if _, err := os.ReadFile(filepath.Join(mnt, "hello.txt")); !errors.Is(err, syscall.EIO) {
		t.Errorf("read in a deleted folder: %v; want EIO", err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "new"), nil, 0o644); !errors.Is(err, syscall.EIO) {
		t.Errorf("create in a deleted folder: %v; want EIO", err)
	}
}
