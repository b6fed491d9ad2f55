// Package access holds the end-to-end tests of the way in without sshd or
// network: banger exec, banger cp and SSH served by the guest agent over
// its channel (virtio-serial under QEMU), on a real TCG guest whose image
// has no sshd and whose network is cut after boot.
package access

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/test/e2e/e2etest"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// accessPackages is the systemd test image without openssh-server, with
// rsync (rsync -e ssh needs it on both ends).
func accessPackages() []string {
	var pkgs []string
	for _, p := range testutil.DebianPackages {
		if p != "openssh-server" {
			pkgs = append(pkgs, p)
		}
	}
	return append(pkgs, "rsync")
}

// guest is one booted VM the subtests share.
type guest struct {
	e    *e2etest.Env
	name string
}

// cli runs banger against the test daemon.
func (g *guest) cli(ctx context.Context, args ...string) e2etest.Result {
	return g.e.D.CLI(ctx, args...)
}

// cmd returns the banger CLI as a command to start (for signals, a pty,
// stdin), inside the test namespace.
func (g *guest) cmd(args ...string) *exec.Cmd {
	d := g.e.D
	c := g.e.NS.Cmd(d.Bin, append([]string{"--socket", d.Socket}, args...)...)
	c.Env = append(os.Environ(), "BANGER_SSH_DIR="+d.SSHDir())
	return c
}

// guestExec runs a command in the guest and returns its stdout, failing
// the test on a non-zero exit.
func (g *guest) guestExec(ctx context.Context, t *testing.T, argv ...string) string {
	t.Helper()
	r := g.cli(ctx, append([]string{"exec", g.name, "--"}, argv...)...)
	if r.Code != 0 {
		t.Fatalf("banger exec %s -- %v: exit %d\nstdout: %s\nstderr: %s", g.name, argv, r.Code, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

func TestE2EAccess(t *testing.T) {
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "ssh", "scp", "sftp", "rsync")
	layoutDir := e2etest.DebianLayout(t, "access", accessPackages())
	e := e2etest.SetupWith(t, nil, "debian-nosshd", func(ns *e2etest.NetNS, reg *e2etest.Registry) string {
		return reg.Push(t, ns, layoutDir, "banger/debian-nosshd")
	})
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	d := e.D
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "idle", "--memory", "256M")
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "acc", "--memory", "1G")
	start := time.Now()
	d.MustCLI(ctx, "vm", "start", "acc", "--wait")
	t.Logf("boot to ready without sshd: %s", time.Since(start).Round(time.Second))
	g := &guest{e: e, name: "acc"}

	// Cut the guest's network: from here on, only the agent channel is left.
	g.guestExec(ctx, t, "sh", "-c", "ip -4 addr flush dev eth0 && ip link set eth0 down")
	if out := g.guestExec(ctx, t, "ip", "-4", "-o", "addr", "show", "scope", "global"); strings.TrimSpace(out) != "" {
		t.Fatalf("guest still has addresses after the cut: %s", out)
	}
	if out := g.guestExec(ctx, t, "sh", "-c", "command -v sshd || echo none"); strings.TrimSpace(out) != "none" {
		t.Fatalf("the image has an sshd: %s", out)
	}

	t.Run("exit codes", func(t *testing.T) { testExitCodes(ctx, t, g) })
	t.Run("not running", func(t *testing.T) {
		r := g.cli(ctx, "exec", "idle", "--", "true")
		if r.Code != 4 || !strings.Contains(r.Stderr, "banger vm start idle") {
			t.Errorf("exec in a stopped VM: exit %d, stderr %q; want 4 and how to start it", r.Code, r.Stderr)
		}
	})
	t.Run("stdin sha256", func(t *testing.T) { testStdinSHA(ctx, t, g) })
	t.Run("tty", func(t *testing.T) { testTTY(ctx, t, g) })
	t.Run("cp round trip", func(t *testing.T) { testCopy(ctx, t, g) })
	t.Run("ssh-config", func(t *testing.T) { testSSHConfig(ctx, t, g) })
	t.Run("concurrent", func(t *testing.T) { testConcurrent(ctx, t, g) })
	t.Run("second uid", func(t *testing.T) { testSecondUID(ctx, t, g) })
	t.Run("killed cli", func(t *testing.T) { testKilledCLI(ctx, t, g) })
	t.Run("agent dies", func(t *testing.T) { testAgentDies(ctx, t, g) })
	t.Run("daemon restart", func(t *testing.T) { testDaemonRestart(ctx, t, g) })

	d.MustCLI(ctx, "vm", "rm", "--force", "acc")
	d.MustCLI(ctx, "vm", "rm", "--force", "idle")
}

func testExitCodes(ctx context.Context, t *testing.T, g *guest) {
	cases := []struct {
		argv     []string
		code     int
		inStderr string
	}{
		{[]string{"true"}, 0, ""},
		{[]string{"sh", "-c", "exit 7"}, 7, ""},
		{[]string{"no-such-command"}, 127, "no-such-command: command not found"},
	}
	for _, tc := range cases {
		r := g.cli(ctx, append([]string{"exec", g.name, "--"}, tc.argv...)...)
		if r.Code != tc.code || !strings.Contains(r.Stderr, tc.inStderr) {
			t.Errorf("banger exec -- %v: exit %d, stderr %q; want %d and %q", tc.argv, r.Code, r.Stderr, tc.code, tc.inStderr)
		}
	}
	// Ctrl-C: SIGINT to the CLI reaches the remote command.
	c := g.cmd("exec", g.name, "--", "sleep", "4242")
	var stderr bytes.Buffer
	c.Stderr = &stderr
	if err := e2etest.Start(c); err != nil {
		t.Fatal(err)
	}
	waitGuest(ctx, t, g, running("4242"))
	_ = c.Process.Signal(syscall.SIGINT)
	err := c.Wait()
	if code := exitCode(err); code != 130 {
		t.Errorf("exec sleep after SIGINT: exit %d (%v, %s); want 130", code, err, stderr.String())
	}
	waitGuest(ctx, t, g, "! "+running("4242"))
}

func testStdinSHA(ctx context.Context, t *testing.T, g *guest) {
	data := make([]byte, 100<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	c := g.cmd("exec", "-i", g.name, "--", "sha256sum")
	c.Stdin = bytes.NewReader(data)
	var out, stderr bytes.Buffer
	c.Stdout, c.Stderr = &out, &stderr
	start := time.Now()
	if err := e2etest.Run(c); err != nil {
		t.Fatalf("exec -i sha256sum: %v: %s", err, stderr.String())
	}
	el := time.Since(start)
	if got := strings.Fields(out.String()); len(got) == 0 || got[0] != hex.EncodeToString(sum[:]) {
		t.Errorf("sha256sum in the guest of 100 MiB piped in = %q; want %x", out.String(), sum)
	}
	t.Logf("100 MiB through exec -i sha256sum: %s (%.1f MB/s)", el.Round(10*time.Millisecond), 100*1.048576/el.Seconds())
}

func testTTY(ctx context.Context, t *testing.T, g *guest) {
	master, slave, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	if err := pty.Setsize(master, &pty.Winsize{Rows: 40, Cols: 100}); err != nil {
		t.Fatal(err)
	}
	c := g.cmd("exec", "-it", g.name, "--", "sh", "-c", "tty; stty size; read x; stty size")
	c.Stdin, c.Stdout, c.Stderr = slave, slave, slave
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
	if err := e2etest.Start(c); err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			_, _ = out.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()
	waitFor(t, func() bool { return strings.Contains(out.String(), "40 100") }, "stty size 40 100 in "+out.String())
	// While it runs, the local terminal is raw.
	if tio, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS); err != nil || tio.Lflag&(unix.ICANON|unix.ECHO) != 0 {
		t.Errorf("local terminal during exec -t: lflag %#x, %v; want raw (no ICANON, no ECHO)", tio.Lflag, err)
	}
	if err := pty.Setsize(master, &pty.Winsize{Rows: 50, Cols: 132}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // the SIGWINCH travels to the guest
	_, _ = master.Write([]byte("\r"))
	err = c.Wait()
	if err != nil {
		t.Errorf("exec -t: %v; output %q", err, out.String())
	}
	got := out.String()
	if !strings.Contains(got, "/dev/pts/") || !strings.Contains(got, "50 132") {
		t.Errorf("exec -t output %q; want a /dev/pts name and 50 132 after the resize", got)
	}
	tio, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
	if err != nil || tio.Lflag&unix.ICANON == 0 || tio.Lflag&unix.ECHO == 0 {
		t.Errorf("local terminal after exec -t: lflag %#x, %v; want ICANON and ECHO restored", tio.Lflag, err)
	}
	_ = slave.Close()
}

// makeTree builds a tree with modes, a symlink, a dangling symlink, an
// empty dir and a file owned by another uid.
func makeTree(t *testing.T, dir string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(dir, "sub", "deeper"), 0o755))
	must(os.Mkdir(filepath.Join(dir, "empty"), 0o700))
	must(os.WriteFile(filepath.Join(dir, "run.sh"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "sub", "secret"), []byte("s3cr3t"), 0o600))
	must(os.WriteFile(filepath.Join(dir, "sub", "deeper", "big"), bytes.Repeat([]byte("0123456789"), 200<<10), 0o644))
	must(os.WriteFile(filepath.Join(dir, "owned"), []byte("by 1234"), 0o640))
	must(os.Lchown(filepath.Join(dir, "owned"), 1234, 1234))
	must(os.Symlink("sub/secret", filepath.Join(dir, "link")))
	must(os.Symlink("/nowhere/at/all", filepath.Join(dir, "dangling")))
	must(os.Chmod(filepath.Join(dir, "sub"), 0o750))
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, p := range []string{"run.sh", "sub/secret", "sub/deeper/big", "owned", "sub/deeper", "empty", "sub"} {
		must(os.Chtimes(filepath.Join(dir, p), old, old))
	}
	must(unix.Lutimes(filepath.Join(dir, "link"), []unix.Timeval{{Sec: old.Unix()}, {Sec: old.Unix()}}))
}

type entry struct {
	mode     fs.FileMode
	mtime    int64
	uid, gid uint32
	link     string
	sum      string
}

func listTree(t *testing.T, dir string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := de.Info()
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		e := entry{mode: fi.Mode(), uid: st.Uid, gid: st.Gid}
		if rel != "." {
			e.mtime = fi.ModTime().Unix()
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			e.link, _ = os.Readlink(p)
		case fi.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			e.sum = fmt.Sprintf("%x", sha256.Sum256(b))
		}
		out[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func testCopy(ctx context.Context, t *testing.T, g *guest) {
	src := filepath.Join(t.TempDir(), "tree")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	makeTree(t, src)
	want := listTree(t, src)
	d := g.e.D
	d.MustCLI(ctx, "cp", src, g.name+":/root/copied")
	// Inside the guest: the owner kept (root caller), the modes and the link.
	out := g.guestExec(ctx, t, "stat", "-c", "%n %u:%g %a", "/root/copied/owned", "/root/copied/sub", "/root/copied/empty")
	for _, w := range []string{"/root/copied/owned 1234:1234 640", "/root/copied/sub 0:0 750", "/root/copied/empty 0:0 700"} {
		if !strings.Contains(out, w) {
			t.Errorf("guest stat: %q does not contain %q", out, w)
		}
	}
	if out := g.guestExec(ctx, t, "readlink", "/root/copied/link"); strings.TrimSpace(out) != "sub/secret" {
		t.Errorf("guest readlink = %q, want sub/secret", out)
	}
	back := t.TempDir()
	d.MustCLI(ctx, "cp", g.name+":/root/copied", back)
	got := listTree(t, filepath.Join(back, "copied"))
	var diffs []string
	for k, w := range want {
		if got[k] != w {
			diffs = append(diffs, fmt.Sprintf("%s: want %+v, got %+v", k, w, got[k]))
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: unexpected %+v", k, got[k]))
		}
	}
	slices.Sort(diffs)
	if len(diffs) > 0 {
		t.Errorf("tree after a round trip through the guest differs:\n%s", strings.Join(diffs, "\n"))
	}
	// A tar stream on stdout, and a missing guest path.
	r := g.cli(ctx, "cp", g.name+":/root/copied/run.sh", "-")
	if r.Code != 0 || !strings.Contains(r.Stdout, "echo hi") {
		t.Errorf("cp VM:file - : exit %d, stderr %q", r.Code, r.Stderr)
	}
	r = g.cli(ctx, "cp", g.name+":/no/such/file", back)
	if r.Code == 0 || !strings.Contains(r.Stderr, "/no/such/file") {
		t.Errorf("cp of a missing guest path: exit %d, stderr %q; want an error naming it", r.Code, r.Stderr)
	}
}

func testSSHConfig(ctx context.Context, t *testing.T, g *guest) {
	d := g.e.D
	cfgText := d.MustCLI(ctx, "ssh-config", g.name)
	for _, w := range []string{"Host " + g.name + ".banger", "ProxyCommand ", "ssh' '--stdio' %n", "UserKnownHostsFile ", "IdentityFile "} {
		if !strings.Contains(cfgText, w) {
			t.Fatalf("ssh-config output lacks %q:\n%s", w, cfgText)
		}
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "ssh_config")
	if err := os.WriteFile(cfg, []byte(cfgText+"Host *\n  BatchMode yes\n  LogLevel ERROR\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	host := g.name + ".banger"
	run := func(name string, args ...string) string {
		t.Helper()
		c := g.e.NS.Cmd(name, args...)
		c.Env = append(os.Environ(), "BANGER_SSH_DIR="+d.SSHDir())
		out, err := e2etest.CombinedOutput(c)
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return string(out)
	}
	if out := run("ssh", "-F", cfg, host, "echo", "via-agent-$((6*7))"); !strings.Contains(out, "via-agent-42") {
		t.Errorf("ssh %s: %q", host, out)
	}
	// banger ssh picks the agent by itself: the image has no sshd and the
	// VM no network.
	if out := d.MustCLI(ctx, "ssh", g.name, "--", "echo", "auto-$((1+1))"); strings.TrimSpace(out) != "auto-2" {
		t.Errorf("banger ssh (auto) = %q, want auto-2", out)
	}
	if out := d.MustCLI(ctx, "ssh", "--via", "agent", g.name, "--", "tty", "-s", "||", "echo", "no-tty"); strings.TrimSpace(out) != "no-tty" {
		t.Errorf("banger ssh --via agent = %q", out)
	}
	payload := filepath.Join(dir, "payload")
	if err := os.WriteFile(payload, bytes.Repeat([]byte("scp!"), 1<<18), 0o640); err != nil {
		t.Fatal(err)
	}
	run("scp", "-F", cfg, payload, host+":/root/payload.scp")
	run("scp", "-F", cfg, host+":/root/payload.scp", filepath.Join(dir, "payload.back"))
	if a, b := mustRead(t, payload), mustRead(t, filepath.Join(dir, "payload.back")); !bytes.Equal(a, b) {
		t.Errorf("scp round trip changed the file (%d -> %d bytes)", len(a), len(b))
	}
	batch := filepath.Join(dir, "batch")
	_ = os.WriteFile(batch, []byte("put "+payload+" /root/payload.sftp\nls -l /root/payload.sftp\n"), 0o600)
	if out := run("sftp", "-F", cfg, "-b", batch, host); !strings.Contains(out, "payload.sftp") {
		t.Errorf("sftp batch output %q", out)
	}
	tree := filepath.Join(dir, "rs")
	if err := os.MkdirAll(filepath.Join(tree, "a", "b"), 0o755); err != nil {
		t.Fatal(err)
	}
	_ = os.WriteFile(filepath.Join(tree, "a", "b", "f"), []byte("rsync\n"), 0o600)
	run("rsync", "-a", "-e", "ssh -F "+cfg, tree+"/", host+":/root/rs/")
	if out := g.guestExec(ctx, t, "sh", "-c", "cat /root/rs/a/b/f; stat -c %a /root/rs/a/b/f; sha256sum /root/payload.sftp"); !strings.Contains(out, "rsync\n600") {
		t.Errorf("after rsync: %q", out)
	}
}

func testConcurrent(ctx context.Context, t *testing.T, g *guest) {
	var wg sync.WaitGroup
	start := time.Now()
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := g.cli(ctx, "exec", g.name, "--", "sh", "-c", fmt.Sprintf("sleep 3; echo session-%d; exit %d", i, i))
			if r.Code != i || strings.TrimSpace(r.Stdout) != fmt.Sprintf("session-%d", i) {
				t.Errorf("concurrent exec %d: exit %d, stdout %q, stderr %q", i, r.Code, r.Stdout, r.Stderr)
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	t.Logf("8 concurrent 3 s sessions took %s", el.Round(100*time.Millisecond))
	if el > 20*time.Second {
		t.Errorf("8 concurrent 3 s sessions took %s: they did not run at the same time", el)
	}
}

func testSecondUID(ctx context.Context, t *testing.T, g *guest) {
	d := g.e.D
	// The socket and the CLI must let uid 65534 in for the test to mean
	// anything: open the test's own directories on the way to them (never
	// anything above the run directory).
	run := e2etest.RunDir()
	if run == "" {
		t.Fatal("no e2e run directory")
	}
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
	for _, args := range [][]string{
		{"exec", g.name, "--", "true"},
		{"cp", g.name + ":/etc/hostname", "-"},
		{"ssh", "--stdio", g.name + ".banger"},
	} {
		c := exec.Command(d.Bin, append([]string{"--socket", d.Socket}, args...)...) //nolint:gosec // test
		c.Env = []string{"PATH=/usr/bin:/bin", "HOME=/nonexistent", "BANGER_SSH_DIR=" + t.TempDir()}
		c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		c.Stdin = strings.NewReader("")
		out, err := e2etest.CombinedOutput(c)
		if code := exitCode(err); code != 3 || !strings.Contains(string(out), "not found") {
			if code == -1 {
				t.Fatalf("banger %v as uid 65534 did not run: %v", args, err)
			}
			t.Errorf("banger %v as uid 65534: exit %d, %q; want 3 (not found)", args, code, out)
		}
	}
}

func testKilledCLI(ctx context.Context, t *testing.T, g *guest) {
	c := g.cmd("exec", g.name, "--", "sh", "-c", "sleep 5151 & sleep 5152; wait")
	if err := e2etest.Start(c); err != nil {
		t.Fatal(err)
	}
	waitGuest(ctx, t, g, running("5152"))
	_ = c.Process.Kill()
	_ = c.Wait()
	waitGuest(ctx, t, g, "! "+running("5151")+" && ! "+running("5152"))
}

func testAgentDies(ctx context.Context, t *testing.T, g *guest) {
	c := g.cmd("exec", g.name, "--", "sleep", "6161")
	var stderr bytes.Buffer
	c.Stderr = &stderr
	if err := e2etest.Start(c); err != nil {
		t.Fatal(err)
	}
	waitGuest(ctx, t, g, running("6161"))
	// Kill the agent from a process of its own session, so that the kill
	// is not undone by the hangup of the exec that starts it.
	killer := "exec </dev/null >/dev/null 2>&1; sleep 1; for f in $(grep -lzx -- '" + bracketLast("/usr/local/bin/banger-vsock-agent") + "' /proc/[0-9]*/cmdline); do p=${f#/proc/}; kill -9 ${p%/cmdline}; done"
	_ = g.cli(ctx, "exec", g.name, "--", "setsid", "-f", "sh", "-c", killer)
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case err := <-done:
		if code := exitCode(err); code != 255 || !strings.Contains(stderr.String(), "lost") {
			t.Errorf("exec when the agent dies: exit %d, stderr %q; want 255 saying the connection was lost", code, stderr.String())
		}
	case <-time.After(60 * time.Second):
		_ = c.Process.Kill()
		t.Fatal("exec hung after the agent died")
	}
	// The agent comes back (systemd restarts it); a new session works.
	waitFor(t, func() bool { return g.cli(ctx, "exec", g.name, "--", "true").Code == 0 }, "exec after the agent restarted")
}

func testDaemonRestart(ctx context.Context, t *testing.T, g *guest) {
	d := g.e.D
	c := g.cmd("exec", g.name, "--", "sleep", "7171")
	var stderr bytes.Buffer
	c.Stderr = &stderr
	if err := e2etest.Start(c); err != nil {
		t.Fatal(err)
	}
	waitGuest(ctx, t, g, running("7171"))
	d.Stop()
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case err := <-done:
		if code := exitCode(err); code != 255 {
			t.Errorf("exec across a daemon stop: exit %d, stderr %q; want 255", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		_ = c.Process.Kill()
		t.Fatal("exec hung after the daemon stopped")
	}
	d.Start()
	e2etest.WaitSettled(ctx, t, d, 2*time.Minute)
	waitFor(t, func() bool { return g.cli(ctx, "exec", g.name, "--", "true").Code == 0 }, "exec after the daemon restarted")
	waitGuest(ctx, t, g, "! "+running("7171"))
}

// running is a guest shell condition: a process has the argument arg
// (one grep over /proc: the image has no procps, and a process per entry
// is slow under TCG). The last character goes in brackets so that grep's
// own command line does not match.
func running(arg string) string {
	return "grep -qzx -- '" + bracketLast(arg) + "' /proc/[0-9]*/cmdline 2>/dev/null"
}

func bracketLast(s string) string {
	return s[:len(s)-1] + "[" + s[len(s)-1:] + "]"
}

// waitGuest waits until sh -c cond succeeds in the guest.
func waitGuest(ctx context.Context, t *testing.T, g *guest, cond string) {
	t.Helper()
	waitFor(t, func() bool { return g.cli(ctx, "exec", g.name, "--", "sh", "-c", cond).Code == 0 }, "guest: "+cond)
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func exitCode(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok { //nolint:errorlint // exec's own type
		return ee.ExitCode()
	}
	return -1
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
