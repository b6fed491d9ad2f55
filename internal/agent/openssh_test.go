package agent

import (
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
)

// proxyEnv makes the test binary a ProxyCommand: it relays stdin and stdout
// to the Unix socket the variable names.
const proxyEnv = "BANGER_AGENT_TEST_PROXY"

func TestMain(m *testing.M) {
	if len(os.Args) == 2 && os.Args[1] == sftpServerArg {
		os.Exit(RunSFTPServer())
	}
	if sock := os.Getenv(proxyEnv); sock != "" {
		c, err := net.Dial("unix", sock)
		if err != nil {
			os.Exit(1)
		}
		go func() { _, _ = io.Copy(c, os.Stdin) }()
		_, _ = io.Copy(os.Stdout, c)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestOpenSSHClients runs OpenSSH's ssh, scp and sftp against the agent's
// SSH server, each connection an OpSSH stream of a mux session, reached
// through a ProxyCommand as banger ssh-config sets it up.
func TestOpenSSHClients(t *testing.T) {
	testutil.RequiresTool(t, "ssh", "scp", "sftp")
	c, _, srv := muxServer(t)
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "id")
	if err := os.WriteFile(keyFile, testPrivateKey(t, srv), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctxTimeout(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	kh := filepath.Join(dir, "known_hosts")
	if err := os.WriteFile(kh, []byte("vm "+st.HostKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "ssh.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				st, err := c.OpenStream(context.Background(), Request{Op: OpSSH})
				if err != nil {
					return
				}
				defer st.Close()
				go func() { _, _ = io.Copy(st, conn) }()
				_, _ = io.Copy(conn, st)
			}()
		}
	}()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "config")
	cfgText := "Host vm\n  User " + me.Username + "\n  ProxyCommand " + self + "\n  IdentityFile " + keyFile +
		"\n  IdentitiesOnly yes\n  UserKnownHostsFile " + kh + "\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
	if err := os.WriteFile(cfg, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(name string, args ...string) string {
		t.Helper()
		cmd := exec.Command(name, args...) //nolint:gosec // test
		cmd.Env = append(os.Environ(), proxyEnv+"="+sock)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return string(out)
	}
	if out := run("ssh", "-F", cfg, "vm", "echo", "hi-$((6*7))"); strings.TrimSpace(out) != "hi-42" {
		t.Errorf("ssh echo = %q", out)
	}
	src := filepath.Join(dir, "payload")
	if err := os.WriteFile(src, []byte(strings.Repeat("scp!", 1<<16)), 0o640); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "payload.scp")
	run("scp", "-F", cfg, src, "vm:"+dst)
	if b, err := os.ReadFile(dst); err != nil || len(b) != 4<<16 {
		t.Errorf("scp upload: %d bytes, %v", len(b), err)
	}
	back := filepath.Join(dir, "back")
	run("scp", "-F", cfg, "vm:"+dst, back)
	batch := filepath.Join(dir, "batch")
	_ = os.WriteFile(batch, []byte("put "+src+" "+dst+".sftp\nls -l "+dst+".sftp\n"), 0o600)
	if out := run("sftp", "-F", cfg, "-b", batch, "vm"); !strings.Contains(out, "payload.scp.sftp") {
		t.Errorf("sftp batch: %q", out)
	}
	if _, err := exec.LookPath("rsync"); err == nil {
		tree := filepath.Join(dir, "tree")
		_ = os.MkdirAll(filepath.Join(tree, "a"), 0o755)
		_ = os.WriteFile(filepath.Join(tree, "a", "f"), []byte("rsync"), 0o600)
		rdst := filepath.Join(t.TempDir(), "rs")
		run("rsync", "-a", "-e", "ssh -F "+cfg, tree+"/", "vm:"+rdst+"/")
		if fi, err := os.Stat(filepath.Join(rdst, "a", "f")); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("rsync -e ssh: %v, %v", fi, err)
		}
	} else {
		testutil.Missing(t, testutil.TierTools, "rsync is not installed (apt-get install rsync)")
	}
}
