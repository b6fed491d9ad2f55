// Package accessimages runs banger exec, banger cp and SSH over the agent
// against images without systemd, sshd or a shell's usual tools: busybox
// and scratch (one static binary), both on banger's own PID 1, on real TCG
// guests. The systemd image is covered by test/e2e/access.
package accessimages

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/test/e2e/e2etest"
	"github.com/google/go-containerregistry/pkg/v1"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

func TestE2EAccessImages(t *testing.T) {
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "ssh", "scp", "sftp")
	busybox := e2etest.LayoutOf(t, testutil.BusyboxRootfsTar(t), v1.Config{
		Cmd: []string{"sh", "-c", "sleep 100000"}, Env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
	})
	scratch := e2etest.LayoutOf(t, testutil.ScratchRootfsTar(t), v1.Config{Entrypoint: []string{"/app"}, Cmd: []string{"x"}})
	e := e2etest.SetupWith(t, nil, "busybox", func(ns *e2etest.NetNS, reg *e2etest.Registry) string {
		return reg.Push(t, ns, busybox, "banger/busybox")
	})
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "image", "pull", e.Reg.Push(t, e.NS, scratch, "banger/scratch"), "--name", "scratch", "--kernel-ref", "deb-cloud")
	// The busybox VM boots from an image whose agent was refreshed: the
	// image first gets an agent that is not this banger's.
	refreshAgent(ctx, t, d, "busybox")
	d.MustCLI(ctx, "vm", "run", "--image", "busybox", "--name", "bb")
	d.MustCLI(ctx, "vm", "run", "--image", "scratch", "--name", "sc")

	cli := func(args ...string) e2etest.Result { return d.CLI(ctx, args...) }
	cmd := func(args ...string) *exec.Cmd {
		c := e.NS.Cmd(d.Bin, append([]string{"--socket", d.Socket}, args...)...)
		c.Env = append(os.Environ(), "BANGER_SSH_DIR="+d.SSHDir())
		return c
	}
	waitGuest := func(t *testing.T, vm, cond string) {
		t.Helper()
		deadline := time.Now().Add(45 * time.Second)
		for cli("exec", vm, "--", "sh", "-c", cond).Code != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s in %s", cond, vm)
			}
			time.Sleep(300 * time.Millisecond)
		}
	}
	running := func(arg string) string {
		return "grep -qzx -- '" + arg[:len(arg)-1] + "[" + arg[len(arg)-1:] + "]' /proc/[0-9]*/cmdline 2>/dev/null"
	}

	t.Run("busybox exit codes", func(t *testing.T) {
		for _, tc := range []struct {
			argv []string
			code int
			msg  string
		}{{[]string{"true"}, 0, ""}, {[]string{"sh", "-c", "exit 7"}, 7, ""}, {[]string{"nope"}, 127, "nope: command not found"}} {
			r := cli(append([]string{"exec", "bb", "--"}, tc.argv...)...)
			if r.Code != tc.code || !strings.Contains(r.Stderr, tc.msg) {
				t.Errorf("exec bb -- %v: exit %d, stderr %q; want %d, %q", tc.argv, r.Code, r.Stderr, tc.code, tc.msg)
			}
		}
		c := cmd("exec", "bb", "--", "sleep", "4242")
		if err := e2etest.Start(c); err != nil {
			t.Fatal(err)
		}
		waitGuest(t, "bb", running("4242"))
		_ = c.Process.Signal(syscall.SIGINT)
		if code := exitCode(c.Wait()); code != 130 {
			t.Errorf("exec sleep after SIGINT: exit %d, want 130", code)
		}
	})
	t.Run("scratch SIGINT", func(t *testing.T) {
		// No shell in scratch: the app's first line says it runs.
		c := cmd("exec", "-e", "SLEEP=4242", "sc", "--", "/app", "sigint")
		stdout, err := c.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := e2etest.Start(c); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err != nil || !strings.HasPrefix(line, "scratch-main") {
			_ = c.Process.Kill()
			_ = c.Wait()
			t.Fatalf("exec /app in scratch: %q, %v", line, err)
		}
		_ = c.Process.Signal(syscall.SIGINT)
		if code := exitCode(c.Wait()); code != 130 {
			t.Errorf("exec /app in scratch after SIGINT: exit %d, want 130", code)
		}
	})
	t.Run("busybox sftp as nobody", func(t *testing.T) {
		cfgText := d.MustCLI(ctx, "ssh-config", "bb", "-l", "nobody")
		cfg := filepath.Join(t.TempDir(), "ssh_config")
		_ = os.WriteFile(cfg, []byte(cfgText+"Host *\n  BatchMode yes\n  LogLevel ERROR\n"), 0o600)
		payload := filepath.Join(t.TempDir(), "payload")
		_ = os.WriteFile(payload, []byte("from sftp as nobody"), 0o600)
		batch := filepath.Join(t.TempDir(), "batch")
		_ = os.WriteFile(batch, []byte("put "+payload+" /tmp/by-nobody\n-put "+payload+" /etc/by-nobody\n"), 0o600)
		c := e.NS.Cmd("sftp", "-F", cfg, "-b", batch, "bb.banger")
		c.Env = append(os.Environ(), "BANGER_SSH_DIR="+d.SSHDir())
		out, err := e2etest.CombinedOutput(c)
		if err != nil {
			t.Fatalf("sftp as nobody: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), "ermission denied") {
			t.Errorf("sftp put as nobody into root's /etc did not say permission denied:\n%s", out)
		}
		r := cli("exec", "bb", "--", "stat", "-c", "%u:%g %n", "/tmp/by-nobody")
		if r.Code != 0 || strings.TrimSpace(r.Stdout) != "65534:65534 /tmp/by-nobody" {
			t.Errorf("file put through sftp as nobody: %q (exit %d, %s); want owned by 65534:65534", r.Stdout, r.Code, r.Stderr)
		}
		if r := cli("exec", "bb", "--", "test", "-e", "/etc/by-nobody"); r.Code == 0 {
			t.Error("nobody wrote into root's /etc through sftp")
		}
	})
	t.Run("busybox stdin sha256", func(t *testing.T) {
		data := make([]byte, 100<<20)
		_, _ = rand.Read(data)
		sum := sha256.Sum256(data)
		c := cmd("exec", "-i", "bb", "--", "sha256sum")
		c.Stdin = bytes.NewReader(data)
		out, err := e2etest.Output(c)
		if err != nil || !strings.HasPrefix(string(out), hex.EncodeToString(sum[:])) {
			t.Errorf("sha256sum of 100 MiB in busybox = %q, %v; want %x", out, err, sum)
		}
	})
	t.Run("busybox concurrent and killed cli", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if r := cli("exec", "bb", "--", "sh", "-c", fmt.Sprintf("sleep 2; exit %d", i)); r.Code != i {
					t.Errorf("concurrent exec %d: exit %d (%s)", i, r.Code, r.Stderr)
				}
			}()
		}
		wg.Wait()
		c := cmd("exec", "bb", "--", "sh", "-c", "sleep 5151 & sleep 5152; wait")
		if err := e2etest.Start(c); err != nil {
			t.Fatal(err)
		}
		waitGuest(t, "bb", running("5152"))
		_ = c.Process.Kill()
		_ = c.Wait()
		waitGuest(t, "bb", "! "+running("5151")+" && ! "+running("5152"))
	})
	for _, vm := range []string{"bb", "sc"} {
		t.Run(vm+" cp round trip and sftp", func(t *testing.T) {
			src := filepath.Join(t.TempDir(), "tree")
			_ = os.MkdirAll(filepath.Join(src, "sub", "empty"), 0o750)
			_ = os.WriteFile(filepath.Join(src, "sub", "f"), []byte("payload"), 0o640)
			_ = os.Symlink("sub/f", filepath.Join(src, "link"))
			old := time.Date(2021, 5, 6, 7, 8, 9, 0, time.UTC)
			_ = os.Chtimes(filepath.Join(src, "sub", "f"), old, old)
			d.MustCLI(ctx, "cp", src, vm+":/tree")
			back := t.TempDir()
			d.MustCLI(ctx, "cp", vm+":/tree", back)
			for _, p := range []string{"sub/f", "sub/empty", "link", "sub"} {
				a, errA := os.Lstat(filepath.Join(src, p))
				b, errB := os.Lstat(filepath.Join(back, "tree", p))
				if errA != nil || errB != nil || a.Mode() != b.Mode() || (!a.IsDir() && !a.ModTime().Equal(b.ModTime())) {
					t.Errorf("%s after a round trip through %s: %v %v / %v %v", p, vm, a, errA, b, errB)
				}
			}
			if l, err := os.Readlink(filepath.Join(back, "tree", "link")); err != nil || l != "sub/f" {
				t.Errorf("link after the round trip: %q, %v", l, err)
			}
			cfgText := d.MustCLI(ctx, "ssh-config", vm)
			cfg := filepath.Join(t.TempDir(), "ssh_config")
			_ = os.WriteFile(cfg, []byte(cfgText+"Host *\n  BatchMode yes\n  LogLevel ERROR\n"), 0o600)
			run := func(name string, args ...string) {
				t.Helper()
				c := e.NS.Cmd(name, args...)
				c.Env = append(os.Environ(), "BANGER_SSH_DIR="+d.SSHDir())
				if out, err := e2etest.CombinedOutput(c); err != nil {
					t.Fatalf("%s %v: %v\n%s", name, args, err, out)
				}
			}
			payload := filepath.Join(t.TempDir(), "payload")
			_ = os.WriteFile(payload, bytes.Repeat([]byte("x"), 1<<20), 0o600)
			run("scp", "-F", cfg, payload, vm+".banger:/payload")
			run("scp", "-F", cfg, vm+".banger:/payload", payload+".back")
			if b, err := os.ReadFile(payload + ".back"); err != nil || len(b) != 1<<20 {
				t.Errorf("scp round trip through %s: %d bytes, %v", vm, len(b), err)
			}
		})
	}
	t.Run("scratch has no shell", func(t *testing.T) {
		r := cli("exec", "sc", "--", "sh", "-c", "true")
		if r.Code != 127 || !strings.Contains(r.Stderr, "sh: command not found") {
			t.Errorf("exec sh in scratch: exit %d, stderr %q; want 127", r.Code, r.Stderr)
		}
	})
	d.MustCLI(ctx, "vm", "rm", "--force", "bb", "sc")
}

// refreshAgent gives the image name an agent that is not this banger's
// (as an image pulled by an older banger has), then checks that
// `banger image refresh-agent` is refused to a second uid (65534) and,
// run by the image's owner (root here), puts this banger's agent back into
// a new image of that name whose root filesystem e2fsck finds clean.
func refreshAgent(ctx context.Context, t *testing.T, d *e2etest.Daemon, name string) {
	t.Helper()
	var img model.Image
	d.JSON(ctx, &img, "image", "inspect", name)
	old := filepath.Join(t.TempDir(), "old-agent")
	if err := os.WriteFile(old, []byte("#!/bin/sh\necho an old agent\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := imagepull.RefreshGuestAgent(ctx, img.RootFS, old); err != nil {
		t.Fatal(err)
	}
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
	c := exec.Command(d.Bin, "--socket", d.Socket, "image", "refresh-agent", name) //nolint:gosec // test
	c.Env = []string{"PATH=/usr/bin:/bin", "HOME=/nonexistent"}
	c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := e2etest.CombinedOutput(c)
	if code := exitCode(err); code <= 0 || !strings.Contains(string(out), "only its owner or root may refresh its agent") {
		t.Errorf("image refresh-agent as uid 65534: exit %d, %q; want refused", code, out)
	}
	var refreshed model.Image
	d.JSON(ctx, &refreshed, "image", "refresh-agent", name)
	if refreshed.ID == img.ID || refreshed.Name != name {
		t.Fatalf("image refresh-agent -o json: %+v (was id %s)", refreshed, img.ID)
	}
	if out, err := exec.CommandContext(ctx, "e2fsck", "-fn", refreshed.RootFS).CombinedOutput(); err != nil { //nolint:gosec // test
		t.Errorf("e2fsck -fn of the refreshed image: %v\n%s", err, out)
	}
	agent, err := exec.CommandContext(ctx, "debugfs", "-R", "cat "+imagepull.GuestAgentPath, refreshed.RootFS).Output() //nolint:gosec // test
	if err != nil || bytes.Contains(agent, []byte("an old agent")) || !bytes.HasPrefix(agent, []byte("\x7fELF")) {
		t.Errorf("agent in the refreshed image: %d bytes starting %q, %v; want this banger's", len(agent), agent[:min(len(agent), 16)], err)
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
