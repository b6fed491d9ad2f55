package mounts

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// caller is the unprivileged user every command of the test runs as.
const caller = 65534

// secret is the content of a host file outside every shared folder; no
// guest output may ever hold it.
const secret = "banger host secret 7f3c"

// bootMain is the image's main process: it reads the shared folder first
// thing, before the host has served it (the read waits for the host), and
// keeps what it saw.
const bootMain = `cat /mnt/src/hello.txt > /run/seen-at-boot 2>&1 || echo "boot read failed: $?" >> /run/seen-at-boot; exec sleep 2147483647`

// folders is the host side of the test, under the run directory (swept by
// the harness if the test dies) and reachable by the caller:
//
//	base/secret     0644 root, holds secret: outside every shared folder
//	base/share/     0755 caller: mounted rw at /mnt/src
//	  hello.txt
//	  escape      → ../secret
//	  abs         → base (absolute host path)
//	base/ro/        0755 caller: mounted :ro at /mnt/ro
//	base/private/   0700 root: the caller cannot read it
//	base/to-root  → /root
//	base/disk/      an ext4 file system on a loop device, owned by the
//	                caller: mounted rw at /mnt/disk
type folders struct {
	base, share, ro, private, toRoot, disk, loop string
}

func newFolders(t *testing.T, ctx context.Context) *folders {
	t.Helper()
	testutil.RequiresLoop(t)
	testutil.RequiresTool(t, "mkfs.ext4", "losetup")
	run := e2etest.RunDir()
	if run == "" {
		t.Fatal("no e2e run directory")
	}
	base, err := os.MkdirTemp(run, "folders-")
	if err != nil {
		t.Fatal(err)
	}
	f := &folders{base: base, share: filepath.Join(base, "share"), ro: filepath.Join(base, "ro"),
		private: filepath.Join(base, "private"), toRoot: filepath.Join(base, "to-root"), disk: filepath.Join(base, "disk")}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for p := base; p == run || strings.HasPrefix(p, run+"/"); p = filepath.Dir(p) {
		must(os.Chmod(p, 0o755))
	}
	must(os.WriteFile(filepath.Join(base, "secret"), []byte(secret), 0o644))
	for _, d := range []string{f.share, f.ro, f.disk} {
		must(os.Mkdir(d, 0o755))
	}
	must(os.Mkdir(f.private, 0o700))
	must(os.WriteFile(filepath.Join(f.share, "hello.txt"), []byte("hello from the host\n"), 0o644))
	must(os.WriteFile(filepath.Join(f.ro, "ro.txt"), []byte("read me\n"), 0o644))
	must(os.Symlink("../secret", filepath.Join(f.share, "escape")))
	must(os.Symlink(base, filepath.Join(f.share, "abs")))
	must(os.Symlink("/root", f.toRoot))
	for _, p := range []string{f.share, f.ro, filepath.Join(f.share, "hello.txt"), filepath.Join(f.ro, "ro.txt")} {
		must(os.Chown(p, caller, caller))
	}
	img := filepath.Join(base, "disk.img")
	sh := func(name string, args ...string) string {
		t.Helper()
		out, err := e2etest.CombinedOutput(exec.CommandContext(ctx, name, args...))
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	sh("truncate", "-s", "64M", img)
	sh("mkfs.ext4", "-q", "-F", img)
	dev := sh("losetup", "-f", "--show", img)
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	f.loop = filepath.Base(dev)
	// A long journal commit interval: file data reaches the device only by
	// writeback or fsync within the test.
	sh("mount", "-t", "ext4", "-o", "commit=300", dev, f.disk)
	t.Cleanup(func() {
		if err := syscall.Unmount(f.disk, 0); err != nil {
			_ = syscall.Unmount(f.disk, syscall.MNT_DETACH)
		}
	})
	must(os.Chown(f.disk, caller, caller))
	return f
}

// sectorsWritten is the loop device's count of sectors written.
func (f *folders) sectorsWritten(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", f.loop, "stat"))
	if err != nil {
		t.Fatal(err)
	}
	fields := strings.Fields(string(b))
	if len(fields) < 7 {
		t.Fatalf("/sys/block/%s/stat: %q", f.loop, b)
	}
	n, err := strconv.ParseInt(fields[6], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// cli runs the banger CLI as the caller through the daemon's socket.
type cli struct {
	d      *e2etest.Daemon
	sshDir string // the caller's banger SSH key directory
}

func (c cli) run(ctx context.Context, args ...string) e2etest.Result {
	cmd := exec.CommandContext(ctx, c.d.Bin, append([]string{"--socket", c.d.Socket}, args...)...) //nolint:gosec // test
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/nonexistent", "BANGER_SSH_DIR=" + c.sshDir}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: caller, Gid: caller}}
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := e2etest.Run(cmd)
	code := 0
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		code = -1
		errb.WriteString(err.Error())
	}
	return e2etest.Result{Stdout: out.String(), Stderr: errb.String(), Code: code}
}

func (c cli) must(t *testing.T, ctx context.Context, args ...string) string {
	t.Helper()
	start := time.Now()
	r := c.run(ctx, args...)
	t.Logf("banger %s as uid %d (%s)", strings.Join(args, " "), caller, time.Since(start).Round(100*time.Millisecond))
	if r.Code != 0 {
		t.Fatalf("banger %s as uid %d: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), caller, r.Code, r.Stdout, e2etest.Tail(r.Stderr, 40))
	}
	return r.Stdout
}

// sh runs script in the guest through banger exec, as the caller.
func (c cli) sh(ctx context.Context, vm, script string) e2etest.Result {
	return c.run(ctx, "exec", vm, "--", "sh", "-c", script)
}

func owner(t *testing.T, p string) (uint32, uint32) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Uid, st.Gid
}

// TestE2EMountsAsSecondUID: uid 65534 runs a busybox VM with three host
// folders through the daemon's socket. The main process reads the folder
// at boot and sees the host's file (mounted at boot, served once the agent
// is up); both sides write and the host owners are the caller's; a guest
// fsync puts the data on the host's disk; :ro refuses guest writes; a
// symlink pointing out of the folder (relative or absolute) and a guest
// ".." never reach host files; a folder the caller cannot read and a
// symlink to /root are refused at create with nothing recorded. Then, on a
// systemd image, a plain service started at boot reads the folder.
func TestE2EMountsAsSecondUID(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	// Before the daemon starts: it runs in a mount namespace of its own
	// (the test's network namespace), copied from this one at its start.
	f := newFolders(t, ctx)
	e := e2etest.SetupBusybox(t, nil, "folders", bootMain, nil)
	d := e.D
	// The socket and the daemon's executable (which runs the mount servers
	// as the caller) must be reachable by the caller: open the test's own
	// directories on the way (never anything above the run directory).
	run := e2etest.RunDir()
	for _, target := range []string{d.Socket, d.Bin} {
		for p := filepath.Dir(target); p == run || strings.HasPrefix(p, run+"/"); p = filepath.Dir(p) {
			if err := os.Chmod(p, 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.Chmod(d.Socket, 0o666); err != nil {
		t.Fatal(err)
	}
	c := cli{d: d, sshDir: filepath.Join(f.base, "ssh")}
	if err := os.Mkdir(c.sshDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(c.sshDir, caller, caller); err != nil {
		t.Fatal(err)
	}

	// Refused at create: nothing recorded.
	for _, tc := range []struct{ what, spec string }{
		{"a folder the caller cannot read", f.private + ":/mnt/p:ro"},
		{"a symlink to /root", f.toRoot + ":/mnt/r:ro"},
		{"a folder the caller cannot write, rw", filepath.Dir(f.share) + ":/mnt/w"},
	} {
		r := c.run(ctx, "vm", "create", "--image", "folders", "--name", "refused", "--mount", tc.spec)
		if r.Code == 0 {
			t.Errorf("vm create --mount %s (%s) as uid %d succeeded", tc.spec, tc.what, caller)
		} else if !strings.Contains(r.Stderr, "may not") && !strings.Contains(r.Stderr, "permission denied") {
			t.Errorf("vm create --mount %s (%s): stderr %q; want it to say the caller may not use the folder", tc.spec, tc.what, r.Stderr)
		}
	}
	if ls := d.MustCLI(ctx, "vm", "ls"); strings.Contains(ls, "refused") {
		t.Errorf("a refused create left a VM record:\n%s", ls)
	}

	c.must(t, ctx, "vm", "run", "--image", "folders", "--name", "f",
		"--mount", f.share+":/mnt/src", "--mount", f.ro+":/mnt/ro:ro", "--mount", f.disk+":/mnt/disk")
	var vm struct {
		OwnerUID uint32   `json:"owner_uid"`
		Mounts   []string `json:"mounts"`
	}
	d.JSON(ctx, &vm, "vm", "inspect", "f")
	if vm.OwnerUID != caller || len(vm.Mounts) != 3 {
		t.Fatalf("vm inspect f: owner uid %d, mounts %q; want uid %d and the three folders", vm.OwnerUID, vm.Mounts, caller)
	}

	// The main process read the folder at boot, before the host served it.
	var seen string
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		if r := c.sh(ctx, "f", "cat /run/seen-at-boot"); r.Code == 0 && r.Stdout != "" {
			seen = r.Stdout
			break
		}
	}
	if seen != "hello from the host\n" {
		t.Errorf("the main process read /mnt/src/hello.txt at boot as %q; want the host's file", seen)
	}

	// Guest → host: contents and owners are the caller's.
	if r := c.sh(ctx, "f", "echo from the guest > /mnt/src/g.txt && mkdir /mnt/src/gd && echo deep > /mnt/src/gd/f && cat /mnt/src/hello.txt"); r.Code != 0 || r.Stdout != "hello from the host\n" {
		t.Fatalf("guest writes the folder: exit %d, %q, %q", r.Code, r.Stdout, r.Stderr)
	}
	if b, err := os.ReadFile(filepath.Join(f.share, "g.txt")); err != nil || string(b) != "from the guest\n" {
		t.Errorf("host reads the guest's g.txt: %q, %v", b, err)
	}
	for _, p := range []string{"g.txt", "gd", "gd/f"} {
		if uid, gid := owner(t, filepath.Join(f.share, p)); uid != caller || gid != caller {
			t.Errorf("host owner of the guest's %s = %d:%d, want %d:%d (the caller, never root)", p, uid, gid, caller, caller)
		}
	}
	// Host → guest.
	if err := os.WriteFile(filepath.Join(f.share, "late.txt"), []byte("written on the host later\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var late e2etest.Result
	for i := 0; i < 10; i++ {
		if late = c.sh(ctx, "f", "cat /mnt/src/late.txt"); late.Code == 0 {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if late.Stdout != "written on the host later\n" {
		t.Errorf("guest reads a file the host wrote after the mount: %q, %q", late.Stdout, late.Stderr)
	}

	// :ro refuses guest writes; reads work.
	if r := c.sh(ctx, "f", "cat /mnt/ro/ro.txt"); r.Stdout != "read me\n" {
		t.Errorf("guest reads the :ro folder: %q, %q", r.Stdout, r.Stderr)
	}
	for _, script := range []string{"echo x > /mnt/ro/new.txt", "echo x >> /mnt/ro/ro.txt", "rm /mnt/ro/ro.txt", "mkdir /mnt/ro/d"} {
		if r := c.sh(ctx, "f", script); r.Code == 0 {
			t.Errorf("guest %q on the :ro folder succeeded", script)
		} else if !strings.Contains(strings.ToLower(r.Stderr), "read-only") {
			t.Errorf("guest %q on the :ro folder: stderr %q; want a read-only file system error", script, r.Stderr)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(f.ro, "ro.txt")); string(b) != "read me\n" {
		t.Errorf("the :ro folder's file changed: %q", b)
	}
	if ents, _ := os.ReadDir(f.ro); len(ents) != 1 {
		t.Errorf("the :ro folder holds %d entries, want only ro.txt", len(ents))
	}

	// Nothing from the guest side reaches outside the folder.
	out := c.sh(ctx, "f", strings.Join([]string{
		"cat /mnt/src/escape", "cat /mnt/src/abs/secret", "cat /mnt/src/../secret", "cat /mnt/src/../../secret",
		"echo planted > /mnt/src/escape", "echo planted > /mnt/src/abs/secret",
		"ln -s ../secret /mnt/src/mine && cat /mnt/src/mine", "ln -s " + filepath.Join(f.base, "secret") + " /mnt/src/mine2 && cat /mnt/src/mine2",
		"cat /mnt/src/mine2", "true",
	}, "; "))
	if strings.Contains(out.Stdout+out.Stderr, secret) {
		t.Errorf("the guest read the host file outside the folder:\n%s%s", out.Stdout, out.Stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(f.base, "secret")); string(b) != secret {
		t.Errorf("the host file outside the folder changed: %q", b)
	}
	if _, err := os.Lstat(filepath.Join(filepath.Dir(f.base), "secret")); err == nil {
		t.Errorf("a guest write through .. made %s", filepath.Join(filepath.Dir(f.base), "secret"))
	}

	// fsync from the guest reaches the host's disk; a plain write does not.
	const mib4 = 4 << 20 / 512
	before := f.sectorsWritten(t)
	if r := c.sh(ctx, "f", "dd if=/dev/urandom of=/mnt/disk/plain bs=1M count=4 2>&1"); r.Code != 0 {
		t.Fatalf("guest dd without fsync: %q %q", r.Stdout, r.Stderr)
	}
	if got := f.sectorsWritten(t) - before; got >= mib4 {
		t.Fatalf("the host device took %d sectors before any fsync (memory pressure?): this run cannot tell fsync from writeback", got)
	}
	before = f.sectorsWritten(t)
	if r := c.sh(ctx, "f", "dd if=/dev/urandom of=/mnt/disk/synced bs=1M count=4 conv=fsync 2>&1"); r.Code != 0 {
		t.Fatalf("guest dd conv=fsync: %q %q", r.Stdout, r.Stderr)
	}
	if got := f.sectorsWritten(t) - before; got < mib4 {
		t.Errorf("after the guest's fsync returned the host device had taken %d sectors; want at least %d (4 MiB)", got, mib4)
	}
	if uid, _ := owner(t, filepath.Join(f.disk, "synced")); uid != caller {
		t.Errorf("host owner of the guest's synced file = %d, want %d", uid, caller)
	}

	c.must(t, ctx, "vm", "rm", "--force", "f")

	t.Run("systemd", func(t *testing.T) { testSystemdBoot(t, ctx, e, c, f) })
}
