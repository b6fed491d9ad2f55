package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/atomicfile"
)

// sftpServers are where images keep OpenSSH's sftp-server, used for a user
// other than root when the Server has no SFTPServer of its own.
var sftpServers = []string{"/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/lib/ssh/sftp-server", "/usr/libexec/sftp-server"}

// hostKeyPrivate is the private half of HostKeyFile.
func (s *Server) hostKeyPrivate() string {
	return s.path(strings.TrimSuffix(HostKeyFile, ".pub"))
}

// EnsureHostKey makes the guest's ed25519 host key when the image has
// neither half of it (no sshd, or its keys not generated yet), so that the
// agent's SSH server and an sshd the image may have share the key the host
// pins.
func (s *Server) EnsureHostKey() error {
	s.hostMu.Lock()
	defer s.hostMu.Unlock()
	priv := s.hostKeyPrivate()
	for _, p := range []string{priv, s.path(HostKeyFile)} {
		// A key the image has (or its sshd made) is the one pinned.
		if _, err := os.Lstat(p); err == nil {
			return nil
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	privPEM, line, err := NewHostKey()
	if err != nil {
		return fmt.Errorf("generate host key: %w", err)
	}
	dir := filepath.Dir(priv)
	if err := os.MkdirAll(dir, 0o755); err != nil { //nolint:gosec // /etc/ssh is world-readable
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := atomicfile.WriteFile(priv, privPEM, 0o600); err != nil {
		return err
	}
	return atomicfile.WriteFile(s.path(HostKeyFile), []byte(line+"\n"), 0o644)
}

func (s *Server) hostSigner() (ssh.Signer, error) {
	if err := s.EnsureHostKey(); err != nil {
		return nil, err
	}
	b, err := readRegular(s.hostKeyPrivate(), maxHostKeyBytes)
	if err != nil {
		return nil, err
	}
	return ssh.ParsePrivateKey(b)
}

// keyAuthorized reports whether key is in root's authorized_keys (where
// banger installs its owner's key, good for every user) or in the user's.
func (s *Server) keyAuthorized(u *guestUser, key ssh.PublicKey) bool {
	files := []string{s.path(AuthorizedKeysFile)}
	if u.home != "" && u.home != "/" && u.uid != 0 {
		files = append(files, filepath.Join(u.home, ".ssh", "authorized_keys"))
	}
	want := key.Marshal()
	for _, f := range files {
		b, err := readRegular(f, maxAuthorizedBytes)
		if err != nil {
			continue
		}
		for l := range bytes.SplitSeq(b, []byte("\n")) {
			k, _, _, _, err := ssh.ParseAuthorizedKey(l)
			if err == nil && bytes.Equal(k.Marshal(), want) {
				return true
			}
		}
	}
	return false
}

// serveSSH speaks the SSH protocol on c: sessions (shell, exec, PTY, env,
// signals, the sftp subsystem) and direct-tcpip forwarding inside the guest.
func (s *Server) serveSSH(ctx context.Context, c net.Conn) error {
	signer, err := s.hostSigner()
	if err != nil {
		return fmt.Errorf("ssh host key: %w", err)
	}
	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(meta ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			u, err := lookupUser(meta.User())
			if err != nil {
				return nil, err
			}
			if !s.keyAuthorized(u, key) {
				return nil, fmt.Errorf("key not authorized for %s", meta.User())
			}
			return &ssh.Permissions{}, nil
		},
		ServerVersion: "SSH-2.0-banger-agent",
	}
	cfg.AddHostKey(signer)
	sc, chans, reqs, err := ssh.NewServerConn(c, cfg)
	if err != nil {
		return fmt.Errorf("ssh handshake: %w", err)
	}
	defer sc.Close()
	stop := context.AfterFunc(ctx, func() { _ = sc.Close() })
	defer stop()
	go ssh.DiscardRequests(reqs)
	var wg sync.WaitGroup
	defer wg.Wait()
	for nc := range chans {
		switch nc.ChannelType() {
		case "session":
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.sshSession(ctx, sc.User(), nc)
			}()
		case "direct-tcpip":
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.sshDirect(ctx, nc)
			}()
		default:
			_ = nc.Reject(ssh.UnknownChannelType, "banger's agent serves session and direct-tcpip channels")
		}
	}
	return nil
}

type sshSession struct {
	s    *Server
	user string
	ch   ssh.Channel
	env  []string
	tty  bool
	term string
	size Winsize
	mu   sync.Mutex
	proc *process
}

func (s *Server) sshSession(ctx context.Context, user string, nc ssh.NewChannel) {
	ch, reqs, err := nc.Accept()
	if err != nil {
		return
	}
	defer ch.Close()
	ss := &sshSession{s: s, user: user, ch: ch}
	done := make(chan struct{})
	var once sync.Once
	finish := func() { once.Do(func() { close(done) }) }
	for {
		select {
		case <-ctx.Done():
			ss.hangup()
			return
		case <-done:
			return
		case req, ok := <-reqs:
			if !ok {
				ss.hangup()
				return
			}
			ok, started := ss.handle(req, finish)
			if req.WantReply {
				_ = req.Reply(ok, nil)
			}
			if started != nil {
				go started()
			}
		}
	}
}

func (ss *sshSession) hangup() {
	ss.mu.Lock()
	p := ss.proc
	ss.mu.Unlock()
	if p != nil {
		select {
		case <-p.done:
		default:
			p.hangup()
		}
	}
}

// handle answers one channel request; started, when set, runs the command
// the request asked for (after the reply is sent).
func (ss *sshSession) handle(req *ssh.Request, finish func()) (ok bool, started func()) {
	switch req.Type {
	case "pty-req":
		var m struct {
			Term             string
			Cols, Rows, W, H uint32
			Modes            string
		}
		if ssh.Unmarshal(req.Payload, &m) != nil {
			return false, nil
		}
		ss.tty, ss.term, ss.size = true, m.Term, Winsize{Rows: clamp16(m.Rows), Cols: clamp16(m.Cols)}
		return true, nil
	case "env":
		var m struct{ Name, Value string }
		if ssh.Unmarshal(req.Payload, &m) != nil || m.Name == "" || strings.ContainsAny(m.Name, "=\x00") || strings.ContainsRune(m.Value, 0) {
			return false, nil
		}
		ss.env = append(ss.env, m.Name+"="+m.Value)
		return true, nil
	case "window-change":
		var m struct{ Cols, Rows, W, H uint32 }
		if ssh.Unmarshal(req.Payload, &m) != nil {
			return false, nil
		}
		ss.size = Winsize{Rows: clamp16(m.Rows), Cols: clamp16(m.Cols)}
		ss.mu.Lock()
		if ss.proc != nil {
			ss.proc.resize(ss.size)
		}
		ss.mu.Unlock()
		return true, nil
	case "signal":
		var m struct{ Signal string }
		if ssh.Unmarshal(req.Payload, &m) != nil {
			return false, nil
		}
		sig, known := sshSignals[m.Signal]
		ss.mu.Lock()
		if known && ss.proc != nil {
			ss.proc.signal(sig)
		}
		ss.mu.Unlock()
		return known, nil
	case "shell", "exec", "subsystem":
		if ss.proc != nil {
			return false, nil
		}
		var run func()
		switch req.Type {
		case "shell":
			run = func() { ss.run(nil, finish) }
		case "exec":
			var m struct{ Command string }
			if ssh.Unmarshal(req.Payload, &m) != nil || strings.ContainsRune(m.Command, 0) {
				return false, nil
			}
			run = func() { ss.run([]string{m.Command}, finish) }
		case "subsystem":
			var m struct{ Name string }
			if ssh.Unmarshal(req.Payload, &m) != nil || m.Name != "sftp" {
				return false, nil
			}
			run = func() { ss.sftp(finish) }
		}
		return true, run
	}
	return false, nil
}

func clamp16(v uint32) uint16 {
	if v > 0xffff {
		return 0xffff
	}
	return uint16(v)
}

var sshSignals = map[string]syscall.Signal{
	"HUP": syscall.SIGHUP, "INT": syscall.SIGINT, "QUIT": syscall.SIGQUIT, "TERM": syscall.SIGTERM,
	"KILL": syscall.SIGKILL, "USR1": syscall.SIGUSR1, "USR2": syscall.SIGUSR2, "ALRM": syscall.SIGALRM,
}

// run starts the login shell, or command through it, and reports its exit.
func (ss *sshSession) run(command []string, finish func()) {
	defer finish()
	u, err := lookupUser(ss.user)
	if err != nil {
		ss.fail(exitCannotRun, err.Error())
		return
	}
	argv := []string{"-" + filepath.Base(u.shell)}
	if command != nil {
		argv = []string{filepath.Base(u.shell), "-c", command[0]}
	}
	env := mergeEnv(baseEnv(u, ss.tty, ss.term), ss.env)
	dir := u.home
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		dir = "/"
	}
	spec := &procSpec{path: u.shell, argv: argv, env: env, dir: dir, cred: u.cred, tty: ss.tty, size: ss.size, stdin: true}
	ss.start1(spec)
}

func (ss *sshSession) start1(spec *procSpec) {
	p, err := startProcess(spec, ss.ch, ss.ch.Stderr())
	if err != nil {
		code := exitCannotRun
		var ee *exitError
		if errors.As(err, &ee) {
			code = ee.code
		}
		ss.fail(code, err.Error())
		return
	}
	ss.mu.Lock()
	ss.proc = p
	ss.mu.Unlock()
	go func() {
		_, _ = io.Copy(p.stdin, ss.ch)
		if p.pty == nil {
			p.closeStdin()
		}
	}()
	st := p.wait()
	ss.exit(st)
}

func (ss *sshSession) fail(code int, msg string) {
	_, _ = fmt.Fprintf(ss.ch.Stderr(), "banger: %s\r\n", msg)
	ss.exit(ExitStatus{Code: code})
}

func (ss *sshSession) exit(st ExitStatus) {
	if st.Signal != "" {
		name := strings.TrimPrefix(st.Signal, "SIG")
		_, _ = ss.ch.SendRequest("exit-signal", false, ssh.Marshal(struct {
			Signal     string
			CoreDumped bool
			Error      string
			Lang       string
		}{Signal: name}))
	} else {
		_, _ = ss.ch.SendRequest("exit-status", false, ssh.Marshal(struct{ Status uint32 }{uint32(st.Code)})) //nolint:gosec // 0..255
	}
	_ = ss.ch.CloseWrite()
	_ = ss.ch.Close()
}

// sftp serves the sftp subsystem as the login user. For the agent's own
// user (root) it runs in process; for anyone else it runs banger's own
// SFTP server (Server.SFTPServer: the guest program in its sftp-server
// mode) as a child with the user's uid, gid and groups, so every file is
// opened, created and owned as that user, as OpenSSH's sftp-server would.
// Without one it falls back to the image's sftp-server.
func (ss *sshSession) sftp(finish func()) {
	defer finish()
	u, err := lookupUser(ss.user)
	if err != nil {
		ss.fail(exitCannotRun, err.Error())
		return
	}
	dir := u.home
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		dir = "/"
	}
	if u.cred == nil {
		// The server closes its stream when done; the channel must stay
		// open for the exit status.
		code := 0
		if err := ServeSFTP(keepOpen{ss.ch}, dir); err != nil {
			code = 1
		}
		ss.exit(ExitStatus{Code: code})
		return
	}
	if argv := ss.s.SFTPServer; len(argv) > 0 {
		ss.start1(&procSpec{path: argv[0], argv: argv, env: baseEnv(u, false, ""), dir: dir, cred: u.cred, stdin: true})
		return
	}
	for _, bin := range sftpServers {
		if _, err := os.Stat(bin); err == nil {
			ss.start1(&procSpec{path: bin, argv: []string{bin}, env: baseEnv(u, false, ""), dir: dir, cred: u.cred, stdin: true})
			return
		}
	}
	ss.fail(exitCannotRun, "sftp as "+ss.user+" needs an sftp-server in the image; log in as root for banger's own")
}

// ServeSFTP serves the SFTP protocol on rw until the client ends it,
// relative paths resolved from dir, with the calling process's rights. The
// guest program's sftp-server mode runs it on stdin and stdout as the
// login user.
func ServeSFTP(rw io.ReadWriteCloser, dir string) error {
	srv, err := sftp.NewServer(rw, sftp.WithServerWorkingDirectory(dir))
	if err != nil {
		return err
	}
	err = srv.Serve()
	_ = srv.Close()
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// RunSFTPServer is the guest program's sftp-server mode: SFTP on stdin and
// stdout from the working directory, as whoever started it (the agent
// starts it as the SSH login user). It returns the exit status.
func RunSFTPServer() int {
	dir, err := os.Getwd()
	if err != nil {
		dir = "/"
	}
	if err := ServeSFTP(stdio{}, dir); err != nil {
		fmt.Fprintf(os.Stderr, "banger sftp-server: %v\n", err)
		return 1
	}
	return 0
}

// stdio is stdin and stdout as one stream.
type stdio struct{}

func (stdio) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdio) Write(p []byte) (int, error) { return os.Stdout.Write(p) }
func (stdio) Close() error                { return os.Stdout.Close() }

// sshDirect forwards a direct-tcpip channel to an address inside the guest.
func (s *Server) sshDirect(ctx context.Context, nc ssh.NewChannel) {
	var m struct {
		DestAddr string
		DestPort uint32
		OrigAddr string
		OrigPort uint32
	}
	if ssh.Unmarshal(nc.ExtraData(), &m) != nil || m.DestPort > 65535 {
		_ = nc.Reject(ssh.ConnectionFailed, "bad direct-tcpip request")
		return
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(m.DestAddr, strconv.Itoa(int(m.DestPort))))
	if err != nil {
		_ = nc.Reject(ssh.ConnectionFailed, err.Error())
		return
	}
	defer conn.Close()
	ch, reqs, err := nc.Accept()
	if err != nil {
		return
	}
	defer ch.Close()
	go ssh.DiscardRequests(reqs)
	done := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(conn, ch)
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(ch, conn)
		_ = ch.CloseWrite()
		done <- struct{}{}
	}()
	<-done
	<-done
}

// keepOpen hides Close from a user of the channel that should not end it.
type keepOpen struct{ ssh.Channel }

func (keepOpen) Close() error { return nil }
