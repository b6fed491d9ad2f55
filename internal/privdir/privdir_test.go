package privdir_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/privdir"
	"github.com/bangerdev/banger/internal/testutil"
)

// nobody is the second uid the plant tests act as.
const nobody = 65534

// openDir returns a fresh dir that uid 65534 can reach (t.TempDir's parents
// are 0700), removed at the end of the test.
func openDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "privdir-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil { //nolint:gosec // the test's plant site
		t.Fatal(err)
	}
	return dir
}

// asNobody runs a shell script as uid/gid 65534 and returns its combined
// output and error.
func asNobody(t *testing.T, script string) (string, error) {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestEnsureMakesPrivateDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "private")
	if err := privdir.Ensure(dir); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Fatalf("Ensure(%s) made mode %v, want 0700", dir, fi.Mode().Perm())
	}
	if err := privdir.Ensure(dir); err != nil {
		t.Fatalf("Ensure on an existing private dir: %v", err)
	}
	f, err := privdir.OpenFile(filepath.Join(dir, "f"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString("hello")
	_ = f.Close()
	b, err := privdir.ReadFile(filepath.Join(dir, "f"), 5)
	if err != nil || string(b) != "hello" {
		t.Fatalf("ReadFile = %q, %v; want hello", b, err)
	}
	if _, err := privdir.ReadFile(filepath.Join(dir, "f"), 4); !errors.Is(err, privdir.ErrUnsafe) {
		t.Fatalf("ReadFile over its limit: %v, want ErrUnsafe", err)
	}
}

// TestPlantsRefused: every plant a local user could leave where the daemon
// keeps private files is refused with ErrUnsafe, promptly, and the daemon
// creates nothing through it.
func TestPlantsRefused(t *testing.T) {
	testutil.RequiresRoot(t)
	outside := filepath.Join(t.TempDir(), "outside")
	cases := []struct {
		name  string
		plant func(t *testing.T, dir string) // makes dir/f (and may change dir)
		dir   bool                           // the dir itself is the plant
	}{
		{"symlink to a file to create", func(t *testing.T, dir string) { mustSymlink(t, outside, filepath.Join(dir, "f")) }, false},
		{"symlink to /dev/zero", func(t *testing.T, dir string) { mustSymlink(t, "/dev/zero", filepath.Join(dir, "f")) }, false},
		{"fifo", func(t *testing.T, dir string) {
			if err := syscall.Mkfifo(filepath.Join(dir, "f"), 0o666); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"file of another uid", func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
			mustChown(t, filepath.Join(dir, "f"))
		}, false},
		{"world-writable dir", func(t *testing.T, dir string) {
			if err := os.Chmod(dir, 0o1777); err != nil { //nolint:gosec // the plant
				t.Fatal(err)
			}
		}, true},
		{"dir of another uid", func(t *testing.T, dir string) { mustChown(t, dir) }, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "private")
			if err := privdir.Ensure(dir); err != nil {
				t.Fatal(err)
			}
			c.plant(t, dir)
			done := make(chan error, 1)
			go func() {
				_, err := privdir.ReadFile(filepath.Join(dir, "f"), 1<<20)
				done <- err
			}()
			select {
			case err := <-done:
				if !errors.Is(err, privdir.ErrUnsafe) {
					t.Fatalf("ReadFile of a planted %s: %v, want ErrUnsafe", c.name, err)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("ReadFile of a planted %s hangs", c.name)
			}
			f, err := privdir.OpenFile(filepath.Join(dir, "f"), os.O_CREATE|os.O_RDWR, 0o600)
			if err == nil {
				_ = f.Close()
				t.Fatalf("OpenFile(O_CREATE) through a planted %s succeeded", c.name)
			}
			if _, err := os.Lstat(outside); err == nil {
				t.Fatalf("OpenFile created %s through the symlink", outside)
			}
			if c.dir {
				if _, err := privdir.MkdirTemp(dir, "x-"); !errors.Is(err, privdir.ErrUnsafe) {
					t.Fatalf("MkdirTemp in a planted %s: %v, want ErrUnsafe", c.name, err)
				}
			}
		})
	}
	t.Run("dir is a symlink", func(t *testing.T) {
		real := filepath.Join(t.TempDir(), "real")
		if err := privdir.Ensure(real); err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(t.TempDir(), "link")
		mustSymlink(t, real, link)
		if err := privdir.Ensure(link); !errors.Is(err, privdir.ErrUnsafe) {
			t.Fatalf("Ensure of a symlinked dir: %v, want ErrUnsafe", err)
		}
	})
}

// TestSecondUIDCannotPlant: a real second uid can neither create nor link a
// file in a dir Ensure made, even when its parent is open to it.
func TestSecondUIDCannotPlant(t *testing.T) {
	testutil.RequiresRoot(t)
	dir := filepath.Join(openDir(t), "private")
	if err := privdir.Ensure(dir); err != nil {
		t.Fatal(err)
	}
	for _, script := range []string{
		`: > "$0/planted"`,
		`ln -s /dev/zero "$0/planted"`,
		`mkfifo "$0/planted"`,
	} {
		out, err := asNobody(t, strings.Replace(script, "$0", dir, 1))
		if err == nil {
			t.Errorf("uid %d ran %q in a private dir: succeeded (%s)", nobody, script, out)
		}
	}
	if _, err := os.Lstat(filepath.Join(dir, "planted")); err == nil {
		t.Fatalf("uid %d planted a file in %s", nobody, dir)
	}
}

func mustSymlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func mustChown(t *testing.T, path string) {
	t.Helper()
	if err := os.Lchown(path, nobody, nobody); err != nil {
		t.Fatal(err)
	}
}
