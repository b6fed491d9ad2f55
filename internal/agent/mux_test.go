package agent

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// socketpair returns two ends of a real Unix stream socket pair.
func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int, name string) net.Conn {
		f := os.NewFile(uintptr(fd), name)
		c, err := net.FileConn(f)
		_ = f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0], "host"), conn(fds[1], "guest")
}

// muxClient serves a test server on a socketpair and returns an upgraded
// client and the guest end (closing it plays an agent that died).
func muxClient(t *testing.T) (*Client, net.Conn) {
	t.Helper()
	c, guest, _ := muxServer(t)
	return c, guest
}

func muxServer(t *testing.T) (*Client, net.Conn, *Server) {
	t.Helper()
	s := newTestServer(t)
	host, guest := socketpair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.ServeConn(ctx, guest)
	}()
	c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{})
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	if err := c.Upgrade(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatalf("Upgrade: %v", err)
	}
	t.Cleanup(func() {
		_ = c.Close()
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("agent did not stop within 10s")
		}
	})
	return c, guest, s
}

type execResult struct {
	st             ExitStatus
	stdout, stderr string
	err            error
}

func runExec(t *testing.T, c *Client, req ExecRequest, eio ExecIO) execResult {
	t.Helper()
	ctx := ctxTimeout(t, 30*time.Second)
	st, err := c.OpenStream(ctx, Request{Op: OpExec, Exec: &req})
	if err != nil {
		return execResult{err: err}
	}
	var out, errb bytes.Buffer
	if eio.Stdout == nil {
		eio.Stdout = &out
	}
	if eio.Stderr == nil {
		eio.Stderr = &errb
	}
	es, err := RunExec(ctx, st, eio)
	return execResult{st: es, stdout: out.String(), stderr: errb.String(), err: err}
}

func TestMuxKeepsFramedOperations(t *testing.T) {
	c, _ := muxClient(t)
	exercise(t, c)
}

func TestExecExitCodes(t *testing.T) {
	c, _ := muxClient(t)
	cases := []struct {
		name     string
		argv     []string
		want     int
		stdout   string
		inStderr string
	}{
		{"true", []string{"true"}, 0, "", ""},
		{"exit 7", []string{"sh", "-c", "echo out; echo err >&2; exit 7"}, 7, "out\n", "err"},
		{"not found", []string{"no-such-command-xyz"}, 127, "", "no-such-command-xyz: command not found"},
		{"not executable", []string{"/etc/passwd"}, 126, "", "permission denied"},
		{"killed", []string{"sh", "-c", "kill -KILL $$"}, 137, "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := runExec(t, c, ExecRequest{Argv: tc.argv}, ExecIO{})
			if r.err != nil {
				t.Fatalf("exec %q: %v", tc.argv, r.err)
			}
			if r.st.Code != tc.want || r.stdout != tc.stdout || !strings.Contains(r.stderr, tc.inStderr) {
				t.Errorf("exec %q = code %d, stdout %q, stderr %q; want %d, %q, stderr containing %q",
					tc.argv, r.st.Code, r.stdout, r.stderr, tc.want, tc.stdout, tc.inStderr)
			}
		})
	}
}

func TestExecEnvUserDir(t *testing.T) {
	c, _ := muxClient(t)
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	r := runExec(t, c, ExecRequest{Argv: []string{"sh", "-c", `echo "$FOO|$(pwd)|$(id -u)|$HOME"`}, User: me.Username, Dir: dir, Env: []string{"FOO=bar baz"}}, ExecIO{})
	want := fmt.Sprintf("bar baz|%s|%s|%s\n", dir, me.Uid, me.HomeDir)
	if r.err != nil || r.st.Code != 0 || r.stdout != want {
		t.Errorf("exec env/user/dir = %+v; want stdout %q", r, want)
	}
	r = runExec(t, c, ExecRequest{Argv: []string{"true"}, User: "no-such-user-xyz"}, ExecIO{})
	if r.st.Code != 126 || !strings.Contains(r.stderr, "no-such-user-xyz") {
		t.Errorf("exec as a missing user = %+v; want 126 naming the user", r)
	}
	r = runExec(t, c, ExecRequest{Argv: []string{"true"}, Dir: "/no/such/dir"}, ExecIO{})
	if r.st.Code != 126 || !strings.Contains(r.stderr, "/no/such/dir") {
		t.Errorf("exec in a missing dir = %+v; want 126 naming the dir", r)
	}
}

func TestExecStdinSHA256(t *testing.T) {
	c, _ := muxClient(t)
	data := make([]byte, 16<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	r := runExec(t, c, ExecRequest{Argv: []string{"sha256sum"}, Stdin: true}, ExecIO{Stdin: bytes.NewReader(data)})
	if r.err != nil || r.st.Code != 0 || !strings.HasPrefix(r.stdout, hex.EncodeToString(sum[:])) {
		t.Errorf("sha256sum of 16 MiB through exec = %+v; want %x", r, sum)
	}
}

func TestExecSignal(t *testing.T) {
	c, _ := muxClient(t)
	sig := make(chan syscall.Signal, 1)
	pr, pw := io.Pipe()
	defer pw.Close()
	var out syncBuffer
	done := make(chan execResult, 1)
	go func() {
		done <- runExec(t, c, ExecRequest{Argv: []string{"sh", "-c", "echo ready; exec sleep 30"}, Stdin: true}, ExecIO{Stdin: pr, Stdout: &out, Signal: sig})
	}()
	waitFor(t, func() bool { return strings.Contains(out.String(), "ready") })
	time.Sleep(100 * time.Millisecond)
	sig <- syscall.SIGINT
	select {
	case r := <-done:
		if r.err != nil || r.st.Code != 130 || r.st.Signal != "SIGINT" {
			t.Errorf("exec after SIGINT = %+v; want 130 (SIGINT)", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("exec did not end within 10s of SIGINT")
	}
}

func TestExecTTY(t *testing.T) {
	c, _ := muxClient(t)
	resize := make(chan Winsize, 1)
	pr, pw := io.Pipe()
	var out syncBuffer
	done := make(chan execResult, 1)
	go func() {
		done <- runExec(t, c, ExecRequest{Argv: []string{"sh", "-c", "tty; stty size; read x; stty size"}, TTY: true, Rows: 40, Cols: 100, Stdin: true},
			ExecIO{Stdin: pr, Stdout: &out, Resize: resize})
	}()
	waitFor(t, func() bool { return strings.Contains(out.String(), "40 100") })
	resize <- Winsize{Rows: 50, Cols: 132}
	time.Sleep(200 * time.Millisecond)
	_, _ = pw.Write([]byte("\n"))
	r := <-done
	_ = pw.Close()
	if r.err != nil || r.st.Code != 0 {
		t.Fatalf("exec -t = %+v", r)
	}
	got := out.String()
	if !strings.Contains(got, "/dev/pts/") || !strings.Contains(got, "40 100") || !strings.Contains(got, "50 132") {
		t.Errorf("exec -t output %q; want a /dev/pts name, 40 100, then 50 132", got)
	}
}

// TestExecHangup: a host that goes away mid-command leaves no process.
func TestExecHangup(t *testing.T) {
	c, _ := muxClient(t)
	st, err := c.OpenStream(ctxTimeout(t, 5*time.Second), Request{Op: OpExec, Exec: &ExecRequest{Argv: []string{"sh", "-c", "echo $$; sleep 60 & wait"}}})
	if err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	go func() { _, _ = readOutput(context.Background(), st, &out, nil) }()
	waitFor(t, func() bool { return strings.HasSuffix(out.String(), "\n") })
	pid, err := strconv.Atoi(strings.TrimSpace(out.String()))
	if err != nil {
		t.Fatalf("pid line %q: %v", out.String(), err)
	}
	_ = st.Close()
	waitFor(t, func() bool { return syscall.Kill(-pid, 0) != nil })
}

// TestExecAgentDies: the agent's end closing mid-stream ends the command
// with ErrSessionLost, without a hang.
func TestExecAgentDies(t *testing.T) {
	c, guest := muxClient(t)
	var out syncBuffer
	done := make(chan execResult, 1)
	go func() {
		done <- runExec(t, c, ExecRequest{Argv: []string{"sh", "-c", "echo ready; sleep 30"}}, ExecIO{Stdout: &out})
	}()
	waitFor(t, func() bool { return strings.Contains(out.String(), "ready") })
	_ = guest.Close()
	select {
	case r := <-done:
		if !errors.Is(r.err, ErrSessionLost) {
			t.Errorf("exec when the agent dies = %+v; want ErrSessionLost", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("exec hung after the agent died")
	}
	if _, err := c.OpenStream(ctxTimeout(t, 5*time.Second), Request{Op: OpExec, Exec: &ExecRequest{Argv: []string{"true"}}}); !errors.Is(err, ErrSessionLost) {
		t.Errorf("OpenStream after the agent died = %v; want ErrSessionLost", err)
	}
}

func TestExecConcurrent(t *testing.T) {
	c, _ := muxClient(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := runExec(t, c, ExecRequest{Argv: []string{"sh", "-c", fmt.Sprintf("sleep 0.3; echo %d; exit %d", i, i)}}, ExecIO{})
			if r.err != nil || r.st.Code != i || r.stdout != fmt.Sprintf("%d\n", i) {
				errs <- fmt.Errorf("session %d = %+v", i, r)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestOldAgent: an agent without mux gets ErrAgentTooOld, and its framed
// operations keep working.
func TestOldAgent(t *testing.T) {
	host, guest := socketpair(t)
	defer guest.Close()
	go func() {
		fc := newFramedConn(guest, false, 0)
		for {
			p, err := fc.fr.next(context.Background(), time.Time{})
			if err != nil {
				return
			}
			var s Server
			resp, _ := s.handlePayload(context.Background(), p)
			if resp.Op == OpMux {
				resp = errorResponse(resp.ID, resp.Op, CodeUnknownOp, "unknown operation")
			}
			_ = fc.send(resp, time.Time{})
		}
	}()
	c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.OpenStream(ctxTimeout(t, 5*time.Second), Request{Op: OpExec, Exec: &ExecRequest{Argv: []string{"true"}}})
	if !errors.Is(err, ErrAgentTooOld) || !strings.Contains(err.Error(), "banger image refresh-agent") {
		t.Errorf("OpenStream on an old agent = %v; want ErrAgentTooOld naming banger image refresh-agent", err)
	}
	if _, err := c.Health(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Errorf("Health after a refused upgrade: %v", err)
	}
}

func TestStreamOpOutsideMux(t *testing.T) {
	s := newTestServer(t)
	resp, _ := s.handlePayload(context.Background(), mustJSON(t, Request{V: ProtocolVersion, ID: 1, Op: OpExec, Exec: &ExecRequest{Argv: []string{"true"}}}))
	if r := framedOnly(resp); r.Error == nil {
		t.Errorf("exec on a framed connection = %+v; want an error", r)
	}
	resp, _ = s.handlePayload(context.Background(), mustJSON(t, Request{V: ProtocolVersion, ID: 1, Op: OpExec, Exec: &ExecRequest{Argv: []string{"a\x00b"}}}))
	if resp.Error == nil || resp.Error.Code != CodeInvalidArgument {
		t.Errorf("exec with a NUL = %+v; want invalid_argument", resp)
	}
}

// tree builds a tree with modes, a symlink, a hard link and an empty dir.
func tree(t *testing.T, dir string) {
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
	must(os.WriteFile(filepath.Join(dir, "sub", "deeper", "big"), bytes.Repeat([]byte("x"), 300<<10), 0o644))
	must(os.Symlink("sub/secret", filepath.Join(dir, "link")))
	must(os.Symlink("/nowhere/at/all", filepath.Join(dir, "dangling")))
	must(os.Link(filepath.Join(dir, "run.sh"), filepath.Join(dir, "hard")))
	must(os.Chmod(filepath.Join(dir, "sub"), 0o750))
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, p := range []string{"run.sh", "sub/secret", "sub/deeper/big", "sub/deeper", "empty", "sub"} {
		must(os.Chtimes(filepath.Join(dir, p), old, old))
	}
	must(unix.Lutimes(filepath.Join(dir, "link"), []unix.Timeval{{Sec: old.Unix()}, {Sec: old.Unix()}}))
}

type entry struct {
	mode  fs.FileMode
	mtime int64
	link  string
	data  string
}

func listTree(t *testing.T, dir string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		e := entry{mode: fi.Mode()}
		if !fi.IsDir() || rel != "." {
			e.mtime = fi.ModTime().Unix()
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			e.link, _ = os.Readlink(p)
		case fi.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			e.data = fmt.Sprintf("%x", sha256.Sum256(b))
		}
		out[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestCopyRoundTrip(t *testing.T) {
	c, _ := muxClient(t)
	src := filepath.Join(t.TempDir(), "tree")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	tree(t, src)
	guestDir := t.TempDir()
	ctx := ctxTimeout(t, 30*time.Second)

	// In: tree → guestDir/copied (does not exist: created, renamed).
	st, err := c.OpenStream(ctx, Request{Op: OpCopyIn, Copy: &CopyRequest{Path: filepath.Join(guestDir, "copied")}})
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	go func() { _ = pw.CloseWithError(WriteTar(pw, src)) }()
	if err := CopyIn(ctx, st, pr); err != nil {
		t.Fatalf("CopyIn: %v", err)
	}
	want := listTree(t, src)
	if diff := diffTrees(want, listTree(t, filepath.Join(guestDir, "copied"))); diff != "" {
		t.Errorf("tree copied in differs (-want +got):\n%s", diff)
	}

	// Out: guestDir/copied → back, into an existing directory.
	back := t.TempDir()
	st, err = c.OpenStream(ctx, Request{Op: OpCopyOut, Copy: &CopyRequest{Path: filepath.Join(guestDir, "copied")}})
	if err != nil {
		t.Fatal(err)
	}
	pr, pw = io.Pipe()
	extracted := make(chan error, 1)
	go func() {
		err := ExtractTar(pr, back, ExtractOptions{UID: -1, GID: -1})
		_ = pr.CloseWithError(err)
		extracted <- err
	}()
	if err := CopyOut(ctx, st, pw); err != nil {
		t.Fatalf("CopyOut: %v", err)
	}
	_ = pw.Close()
	if err := <-extracted; err != nil {
		t.Fatalf("extract: %v", err)
	}
	if diff := diffTrees(want, listTree(t, filepath.Join(back, "copied"))); diff != "" {
		t.Errorf("tree copied out differs (-want +got):\n%s", diff)
	}

	// A missing guest path is a clear error.
	st, err = c.OpenStream(ctx, Request{Op: OpCopyOut, Copy: &CopyRequest{Path: "/no/such/path"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := CopyOut(ctx, st, io.Discard); err == nil || !strings.Contains(err.Error(), "/no/such/path") {
		t.Errorf("CopyOut of a missing path = %v; want an error naming it", err)
	}
}

func diffTrees(want, got map[string]entry) string {
	var b strings.Builder
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			fmt.Fprintf(&b, "-%s %+v\n", k, w)
			continue
		}
		if g != w {
			fmt.Fprintf(&b, "-%s %+v\n+%s %+v\n", k, w, k, g)
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			fmt.Fprintf(&b, "+%s %+v\n", k, g)
		}
	}
	return b.String()
}

func TestExtractRefusesHostileEntries(t *testing.T) {
	cases := map[string]string{
		"dotdot":   "../escape",
		"absolute": "/etc/evil",
		"deep":     "a/../../escape",
	}
	for name, entryName := range cases {
		t.Run(name, func(t *testing.T) {
			var buf bytes.Buffer
			writeOneEntry(t, &buf, entryName)
			err := ExtractTar(&buf, t.TempDir(), ExtractOptions{UID: -1, GID: -1})
			if !errors.Is(err, ErrUnsafeEntry) {
				t.Errorf("extract %q = %v; want ErrUnsafeEntry", entryName, err)
			}
		})
	}
	t.Run("through a symlink", func(t *testing.T) {
		dir := t.TempDir()
		outside := t.TempDir()
		if err := os.Symlink(outside, filepath.Join(dir, "l")); err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		writeOneEntry(t, &buf, "l/file")
		if err := ExtractTar(&buf, dir, ExtractOptions{UID: -1, GID: -1}); !errors.Is(err, ErrUnsafeEntry) {
			t.Errorf("extract through a symlink = %v; want ErrUnsafeEntry", err)
		}
		if ents, _ := os.ReadDir(outside); len(ents) != 0 {
			t.Errorf("extract wrote %v outside the destination", ents)
		}
	})
}

func TestSSHOverStream(t *testing.T) {
	c, _, srv := muxServer(t)
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(testPrivateKey(t, srv))
	if err != nil {
		t.Fatal(err)
	}
	var hostKey ssh.PublicKey
	dial := func(signer ssh.Signer) (*ssh.Client, error) {
		st, err := c.OpenStream(ctxTimeout(t, 5*time.Second), Request{Op: OpSSH})
		if err != nil {
			t.Fatal(err)
		}
		cc, chans, reqs, err := ssh.NewClientConn(st, "vm", &ssh.ClientConfig{
			User: me.Username,
			Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
			HostKeyCallback: func(_ string, _ net.Addr, key ssh.PublicKey) error {
				hostKey = key
				return nil
			},
		})
		if err != nil {
			_ = st.Close()
			return nil, err
		}
		return ssh.NewClient(cc, chans, reqs), nil
	}
	cl, err := dial(signer)
	if err != nil {
		t.Fatalf("ssh with the authorized key: %v", err)
	}
	defer cl.Close()

	// The host key is the one status reports (and the host pins).
	status, err := c.Status(ctxTimeout(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(hostKey))); got != status.HostKey {
		t.Errorf("ssh host key %q; status reports %q", got, status.HostKey)
	}

	sess, err := cl.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.Setenv("GREETING", "hello"); err != nil {
		t.Errorf("Setenv: %v", err)
	}
	out, err := sess.Output(`echo "$GREETING $(id -un)"; exit 3`)
	var ee *ssh.ExitError
	if !errors.As(err, &ee) || ee.ExitStatus() != 3 || string(out) != "hello "+me.Username+"\n" {
		t.Errorf("ssh exec = %q, %v; want %q and exit status 3", out, err, "hello "+me.Username+"\n")
	}

	sess, err = cl.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.RequestPty("xterm", 30, 90, ssh.TerminalModes{}); err != nil {
		t.Fatal(err)
	}
	out, err = sess.Output("tty; stty size")
	if err != nil || !strings.Contains(string(out), "/dev/pts/") || !strings.Contains(string(out), "30 90") {
		t.Errorf("ssh exec with a pty = %q, %v; want a pts and 30 90", out, err)
	}

	sc, err := sftp.NewClient(cl)
	if err != nil {
		t.Fatalf("sftp: %v", err)
	}
	defer sc.Close()
	target := filepath.Join(t.TempDir(), "via-sftp")
	f, err := sc.Create(target)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("over sftp")); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	if b, err := os.ReadFile(target); err != nil || string(b) != "over sftp" {
		t.Errorf("file written over sftp = %q, %v", b, err)
	}

	// Another key is refused.
	_, other, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherSigner, _ := ssh.NewSignerFromKey(other)
	if cl2, err := dial(otherSigner); err == nil {
		_ = cl2.Close()
		t.Errorf("ssh with an unauthorized key succeeded")
	}
}

// testPrivateKey authorizes a fresh key in srv's root and returns it (PEM).
func testPrivateKey(t *testing.T, srv *Server) []byte {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	spub, _ := ssh.NewPublicKey(pub)
	if _, err := srv.authorizeKey(strings.TrimSpace(string(ssh.MarshalAuthorizedKey(spub)))); err != nil {
		t.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(block)
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

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeOneEntry(t *testing.T, w io.Writer, name string) {
	t.Helper()
	tw := tar.NewWriter(w)
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: 1, Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	_, _ = tw.Write([]byte("x"))
	_ = tw.Close()
}
