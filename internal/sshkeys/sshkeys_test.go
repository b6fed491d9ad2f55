package sshkeys

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/testutil"
)

func TestEnsureCreatesAndReloads(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys", "id_ed25519")
	kp, err := Ensure(path, Options{Comment: "banger@test"})
	if err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	for p, want := range map[string]os.FileMode{path: 0o600, path + ".pub": 0o644, filepath.Dir(path): 0o700} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode %o, want %o", p, fi.Mode().Perm(), want)
		}
	}
	if kp.Signer.PublicKey().Type() != ssh.KeyAlgoED25519 || !strings.HasSuffix(kp.AuthorizedKey, " banger@test") {
		t.Errorf("key %q, want an ed25519 key with comment banger@test", kp.AuthorizedKey)
	}
	pub, _ := os.ReadFile(path + ".pub")
	if string(pub) != kp.AuthorizedKey+"\n" {
		t.Errorf(".pub = %q, want %q", pub, kp.AuthorizedKey+"\n")
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 2 {
		t.Errorf("key directory holds %d entries, want 2 (no temp files left)", len(entries))
	}

	// A second call loads the same key and restores a deleted .pub.
	if err := os.Remove(path + ".pub"); err != nil {
		t.Fatal(err)
	}
	again, err := Ensure(path, Options{Comment: "banger@test"})
	if err != nil {
		t.Fatalf("Ensure again: %v", err)
	}
	if !bytes.Equal(again.Signer.PublicKey().Marshal(), kp.Signer.PublicKey().Marshal()) {
		t.Error("second Ensure produced a different key")
	}
	if _, err := os.Stat(path + ".pub"); err != nil {
		t.Errorf(".pub not restored: %v", err)
	}
}

// OpenSSH itself must read the key: ssh-keygen -y derives the public key
// from the private key file.
func TestEnsureKeyReadableByOpenSSH(t *testing.T) {
	testutil.RequiresTool(t, "ssh-keygen")
	path := filepath.Join(t.TempDir(), "id")
	kp, err := Ensure(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ssh-keygen", "-y", "-f", path).CombinedOutput()
	if err != nil {
		t.Fatalf("ssh-keygen -y -f %s: %v: %s", path, err, out)
	}
	if got := strings.Join(strings.Fields(string(out))[:2], " "); got != kp.AuthorizedKey {
		t.Errorf("ssh-keygen derived %q, Ensure reported %q", got, kp.AuthorizedKey)
	}
}

func TestEnsureConcurrentCallersAgree(t *testing.T) {
	path := filepath.Join(t.TempDir(), "id")
	var wg sync.WaitGroup
	keys := make([]string, 8)
	for i := range keys {
		wg.Go(func() {
			kp, err := Ensure(path, Options{})
			if err != nil {
				t.Errorf("Ensure #%d: %v", i, err)
				return
			}
			keys[i] = kp.AuthorizedKey
		})
	}
	wg.Wait()
	for _, k := range keys[1:] {
		if k != keys[0] {
			t.Fatalf("concurrent Ensure calls returned different keys: %q", keys)
		}
	}
}

func TestEnsureRefusesInsecureKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "id")
	if _, err := Ensure(path, Options{}); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Ensure(path, Options{}); !errors.Is(err, ErrInsecureKey) {
		t.Errorf("Ensure(0644 key) = %v, want ErrInsecureKey", err)
	}
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(path, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Ensure(link, Options{}); !errors.Is(err, ErrInsecureKey) {
		t.Errorf("Ensure(symlink) = %v, want ErrInsecureKey", err)
	}
	if _, err := Ensure("relative/id", Options{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("Ensure(relative) = %v, want ErrInvalid", err)
	}
}

func TestEnsureOwner(t *testing.T) {
	testutil.RequiresRoot(t)
	path := filepath.Join(t.TempDir(), "u", "id")
	if _, err := Ensure(path, Options{Owner: &Owner{UID: 4242, GID: 4343}}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + ".pub", filepath.Dir(path)} {
		uid, gid := statOwner(t, p)
		if uid != 4242 || gid != 4343 {
			t.Errorf("%s owned by %d:%d, want 4242:4343", p, uid, gid)
		}
	}
}

func hostKeyLine(t *testing.T) (string, ssh.Signer) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(s.PublicKey()))), s
}

func TestKnownHostsLine(t *testing.T) {
	key, _ := hostKeyLine(t)
	line, err := KnownHostsLine("web-1", key+" root@guest\n")
	if err != nil {
		t.Fatal(err)
	}
	if line != "web-1 "+key {
		t.Errorf("KnownHostsLine = %q, want %q", line, "web-1 "+key)
	}
	bad := map[string][2]string{
		"alias with space":   {"a b", key},
		"alias wildcard":     {"*", key},
		"alias negation":     {"!x", key},
		"alias comma":        {"a,b", key},
		"empty alias":        {"", key},
		"garbage key":        {"vm", "not a key"},
		"two lines":          {"vm", key + "\n" + key},
		"options":            {"vm", "cert-authority " + key},
		"marker injection":   {"vm", "@revoked * " + key},
		"empty key":          {"vm", ""},
		"private key header": {"vm", "-----BEGIN OPENSSH PRIVATE KEY-----"},
	}
	for name, in := range bad {
		if _, err := KnownHostsLine(in[0], in[1]); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: KnownHostsLine(%q, %q) = %v, want ErrInvalid", name, in[0], in[1], err)
		}
	}
}

func TestCommandArgv(t *testing.T) {
	dir := t.TempDir()
	o := SSHOptions{User: "root", IP: "10.0.0.2", KeyPath: dir + "/id", KnownHostsPath: dir + "/kh%h", Alias: "vm1", Command: []string{"uname", "-r"}}
	argv, err := Command(o)
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(argv, " ")
	for _, want := range []string{"StrictHostKeyChecking=yes", "HostKeyAlias=vm1", "UserKnownHostsFile=" + dir + "/kh%%h", "-i " + dir + "/id", "-- 10.0.0.2 uname -r"} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv %q lacks %q", argv, want)
		}
	}
	if strings.Contains(strings.ToLower(joined), "stricthostkeychecking=no") || strings.Contains(strings.ToLower(joined), "accept-new") {
		t.Errorf("argv %q weakens host key checking", argv)
	}
	bad := []func(*SSHOptions){
		func(o *SSHOptions) { o.User = "-oProxyCommand=x" },
		func(o *SSHOptions) { o.IP = "host.example" },
		func(o *SSHOptions) { o.IP = "-oProxyCommand=x" },
		func(o *SSHOptions) { o.KeyPath = "relative" },
		func(o *SSHOptions) { o.KnownHostsPath = "/tmp/a b" },
		func(o *SSHOptions) { o.Alias = "x y" },
		func(o *SSHOptions) { o.Port = 70000 },
	}
	for i, mutate := range bad {
		o2 := o
		mutate(&o2)
		if _, err := Command(o2); !errors.Is(err, ErrInvalid) {
			t.Errorf("case %d: Command(%+v) = %v, want ErrInvalid", i, o2, err)
		}
	}
}

// sshServer is an in-process SSH server (golang.org/x/crypto/ssh) that
// accepts only one client key and answers "exec" requests with the command
// text and an exit status: the real ssh client runs against it.
func sshServer(t *testing.T, hostKey ssh.Signer, clientKey ssh.PublicKey) (port int) {
	t.Helper()
	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(_ ssh.ConnMetadata, k ssh.PublicKey) (*ssh.Permissions, error) {
			if bytes.Equal(k.Marshal(), clientKey.Marshal()) {
				return nil, nil
			}
			return nil, errors.New("unknown key")
		},
	}
	cfg.AddHostKey(hostKey)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go serveSSH(c, cfg)
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

func serveSSH(c net.Conn, cfg *ssh.ServerConfig) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	_, chans, reqs, err := ssh.NewServerConn(c, cfg)
	if err != nil {
		return
	}
	go ssh.DiscardRequests(reqs)
	for nc := range chans {
		if nc.ChannelType() != "session" {
			_ = nc.Reject(ssh.UnknownChannelType, "session only")
			continue
		}
		ch, creqs, err := nc.Accept()
		if err != nil {
			return
		}
		go func() {
			defer ch.Close()
			for r := range creqs {
				if r.Type != "exec" {
					_ = r.Reply(false, nil)
					continue
				}
				cmd := string(r.Payload[4:])
				_ = r.Reply(true, nil)
				fmt.Fprintf(ch, "ran: %s\n", cmd)
				status := uint32(0)
				if cmd == "exit 3" {
					status = 3
				}
				var b [4]byte
				binary.BigEndian.PutUint32(b[:], status)
				_, _ = ch.SendRequest("exit-status", false, b[:])
				return
			}
		}()
	}
}

// The argv runs the real ssh client against a real SSH server: the pinned
// host key is accepted, a different host key is refused, the command's
// output and exit status come back.
func TestCommandAgainstRealSSH(t *testing.T) {
	testutil.RequiresTool(t, "ssh")
	dir := t.TempDir()
	kp, err := Ensure(filepath.Join(dir, "id_ed25519"), Options{Comment: "banger"})
	if err != nil {
		t.Fatal(err)
	}
	hostLine, hostKey := hostKeyLine(t)
	port := sshServer(t, hostKey, kp.Signer.PublicKey())
	kh := filepath.Join(dir, "known_hosts")
	if err := WriteKnownHosts(kh, "vm-under-test", hostLine); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(kh); fi.Mode().Perm() != 0o600 {
		t.Errorf("known_hosts mode %o, want 600", fi.Mode().Perm())
	}
	run := func(cmd ...string) (string, int) {
		t.Helper()
		argv, err := Command(SSHOptions{User: "root", IP: "127.0.0.1", Port: port, KeyPath: kp.PrivateKeyPath,
			KnownHostsPath: kh, Alias: "vm-under-test", Command: cmd})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c := exec.CommandContext(ctx, argv[0], argv[1:]...) //nolint:gosec // argv built by Command
		c.Env = append(slices.Clip(os.Environ()), "HOME="+dir)
		out, err := c.CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("run %q: %v", argv, err)
		}
		return string(out), c.ProcessState.ExitCode()
	}
	if out, code := run("uname", "-r"); code != 0 || out != "ran: uname -r\n" {
		t.Errorf("ssh with the pinned key: exit %d, output %q; want 0, %q", code, out, "ran: uname -r\n")
	}
	if _, code := run("exit", "3"); code != 3 {
		t.Errorf("exit status %d, want 3", code)
	}
	other, _ := hostKeyLine(t)
	if err := WriteKnownHosts(kh, "vm-under-test", other); err != nil {
		t.Fatal(err)
	}
	if out, code := run("true"); code != 255 || !strings.Contains(out, "Host key verification failed") {
		t.Errorf("ssh with a different pinned key: exit %d, output %q; want 255 and a host key verification failure", code, out)
	}
	if err := os.WriteFile(kh, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, code := run("true"); code != 255 {
		t.Errorf("ssh with nothing pinned: exit %d, want 255", code)
	}
}
