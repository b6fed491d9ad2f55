package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
)

// Exec timings on the guest side.
const (
	// hangupGrace is how long a process has after SIGHUP (its host went
	// away) before its process group is killed.
	hangupGrace = 2 * time.Second
	// drainGrace is how long output is still forwarded after the process
	// exited, for children that keep its stdout open.
	drainGrace = time.Second
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Exit codes for a command that never ran, as docker exec uses them.
const (
	exitCannotRun = 126
	exitNotFound  = 127
)

// procSpec is a command resolved inside the guest.
type procSpec struct {
	path  string
	argv  []string
	env   []string
	dir   string
	cred  *syscall.Credential
	tty   bool
	size  Winsize
	stdin bool
}

// guestUser is an account in the guest.
type guestUser struct {
	name  string
	uid   uint32
	gid   uint32
	home  string
	shell string
	cred  *syscall.Credential // nil: run as the agent's own user
}

// lookupUser resolves name (a user name or uid; "" is root, or the agent's
// own user when it does not run as root) in the guest's /etc/passwd. An
// image without /etc/passwd (scratch) still runs commands as root.
func lookupUser(name string) (*guestUser, error) {
	self := uint32(os.Geteuid()) //nolint:gosec // uids are non-negative
	var u *user.User
	var err error
	switch {
	case name == "":
		u, err = user.LookupId(strconv.Itoa(int(self)))
		if err != nil {
			home := "/"
			if self == 0 {
				if fi, statErr := os.Stat("/root"); statErr == nil && fi.IsDir() {
					home = "/root"
				}
			}
			return &guestUser{name: "root", uid: self, gid: uint32(os.Getegid()), home: home, shell: "/bin/sh"}, nil //nolint:gosec // gids are non-negative
		}
	case isNumber(name):
		u, err = user.LookupId(name)
		if err != nil {
			uid, _ := strconv.ParseUint(name, 10, 32)
			u = &user.User{Uid: name, Gid: strconv.FormatUint(uid, 10), Username: name, HomeDir: "/"}
		}
	default:
		u, err = user.Lookup(name)
		if err != nil && name == "root" {
			return lookupUser("") // an image without /etc/passwd (busybox, scratch) still has root
		}
		if err != nil {
			return nil, fmt.Errorf("no user %q in the guest's /etc/passwd", name)
		}
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("user %q has a non-numeric uid or gid", name)
	}
	gu := &guestUser{name: u.Username, uid: uint32(uid), gid: uint32(gid), home: u.HomeDir, shell: loginShell(u.Username)}
	if gu.home == "" {
		gu.home = "/"
	}
	if gu.uid != self || uint32(os.Getegid()) != gu.gid { //nolint:gosec // gids are non-negative
		if self != 0 {
			return nil, fmt.Errorf("the agent runs as uid %d and cannot switch to user %q", self, name)
		}
		cred := &syscall.Credential{Uid: gu.uid, Gid: gu.gid}
		if ids, err := u.GroupIds(); err == nil {
			for _, g := range ids {
				if n, err := strconv.ParseUint(g, 10, 32); err == nil {
					cred.Groups = append(cred.Groups, uint32(n))
				}
			}
		}
		gu.cred = cred
	}
	return gu, nil
}

func isNumber(s string) bool {
	_, err := strconv.ParseUint(s, 10, 32)
	return err == nil
}

// loginShell reads the user's shell from /etc/passwd (os/user does not).
func loginShell(name string) string {
	b, err := readLimited("/etc/passwd", 4<<20)
	if err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			f := strings.Split(line, ":")
			if len(f) == 7 && f[0] == name && f[6] != "" {
				if _, err := os.Stat(f[6]); err == nil {
					return f[6]
				}
			}
		}
	}
	for _, sh := range []string{"/bin/bash", "/bin/sh"} {
		if _, err := os.Stat(sh); err == nil {
			return sh
		}
	}
	return "/bin/sh"
}

// exitError is why a command could not run, with its exit code.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func cannotRun(format string, args ...any) *exitError {
	return &exitError{code: exitCannotRun, msg: fmt.Sprintf(format, args...)}
}

// resolveExec turns a request into a command to start.
func resolveExec(req *ExecRequest) (*procSpec, error) {
	u, err := lookupUser(req.User)
	if err != nil {
		return nil, cannotRun("%v", err)
	}
	env := baseEnv(u, req.TTY, req.Term)
	env = mergeEnv(env, req.Env)
	dir := req.Dir
	if dir == "" {
		dir = u.home
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			dir = "/"
		}
	} else if !filepath.IsAbs(dir) {
		dir = filepath.Join(u.home, dir)
	}
	if fi, err := os.Stat(dir); err != nil {
		return nil, cannotRun("working directory %q: %v", dir, err)
	} else if !fi.IsDir() {
		return nil, cannotRun("working directory %q is not a directory", dir)
	}
	path, err := lookPath(req.Argv[0], envValue(env, "PATH"), dir)
	if err != nil {
		return nil, err
	}
	return &procSpec{
		path: path, argv: req.Argv, env: env, dir: dir, cred: u.cred,
		tty: req.TTY, size: Winsize{Rows: req.Rows, Cols: req.Cols}, stdin: req.Stdin,
	}, nil
}

// baseEnv is the environment a login would give u.
func baseEnv(u *guestUser, tty bool, term string) []string {
	env := []string{
		"PATH=" + defaultPath,
		"HOME=" + u.home,
		"USER=" + u.name,
		"LOGNAME=" + u.name,
		"SHELL=" + u.shell,
	}
	if tty {
		if term == "" {
			term = "xterm"
		}
		env = append(env, "TERM="+term)
	}
	return env
}

// mergeEnv sets every KEY=VALUE of add in env, replacing earlier values.
func mergeEnv(env, add []string) []string {
	out := append([]string{}, env...)
	for _, kv := range add {
		k, _, _ := strings.Cut(kv, "=")
		replaced := false
		for i, old := range out {
			if strings.HasPrefix(old, k+"=") {
				out[i], replaced = kv, true
				break
			}
		}
		if !replaced {
			out = append(out, kv)
		}
	}
	return out
}

func envValue(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if v, ok := strings.CutPrefix(env[i], key+"="); ok {
			return v
		}
	}
	return ""
}

// lookPath finds file in pathEnv the way a shell does; the errors carry
// exit codes 127 (not found) and 126 (found but not executable).
func lookPath(file, pathEnv, dir string) (string, error) {
	check := func(p string) error {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		if fi.IsDir() {
			return fmt.Errorf("%s is a directory: %w", p, fs.ErrPermission)
		}
		if fi.Mode()&0o111 == 0 {
			return fmt.Errorf("%s is not executable: %w", p, fs.ErrPermission)
		}
		return nil
	}
	if strings.Contains(file, "/") {
		p := file
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if err := check(p); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return "", &exitError{code: exitNotFound, msg: fmt.Sprintf("%s: no such file or directory", file)}
			}
			return "", cannotRun("%s: permission denied", file)
		}
		return p, nil
	}
	denied := false
	for d := range strings.SplitSeq(pathEnv, ":") {
		if d == "" {
			d = "."
		}
		p := filepath.Join(d, file)
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		err := check(p)
		if err == nil {
			return p, nil
		}
		if errors.Is(err, fs.ErrPermission) {
			denied = true
		}
	}
	if denied {
		return "", cannotRun("%s: permission denied", file)
	}
	return "", &exitError{code: exitNotFound, msg: fmt.Sprintf("%s: command not found", file)}
}

// process is a started command.
type process struct {
	cmd     *exec.Cmd
	pty     *os.File       // the terminal's master side; nil without a TTY
	stdin   io.WriteCloser // where input goes; nil when stdin is closed
	outputs sync.WaitGroup
	closers []io.Closer // read ends of the output, closed after drainGrace
	done    chan struct{}
	mu      sync.Mutex
	exited  bool
}

// startProcess starts spec with its output going to stdout and stderr
// (with a TTY both go to stdout). The process leads a session of its own,
// so that signals and the hangup reach everything it started.
func startProcess(spec *procSpec, stdout, stderr io.Writer) (*process, error) {
	cmd := &exec.Cmd{Path: spec.path, Args: spec.argv, Env: spec.env, Dir: spec.dir}
	attr := &syscall.SysProcAttr{Setsid: true, Credential: spec.cred}
	p := &process{cmd: cmd, done: make(chan struct{})}
	if spec.tty {
		attr.Setctty = true
		cmd.SysProcAttr = attr
		size := &pty.Winsize{Rows: spec.size.Rows, Cols: spec.size.Cols}
		if size.Rows == 0 || size.Cols == 0 {
			size = &pty.Winsize{Rows: 24, Cols: 80}
		}
		master, err := pty.StartWithAttrs(cmd, size, attr)
		if err != nil {
			return nil, startError(spec, err)
		}
		p.pty = master
		p.stdin = master
		p.closers = append(p.closers, master)
		p.copyOut(stdout, master)
		return p, nil
	}
	cmd.SysProcAttr = attr
	var childEnds []*os.File
	defer func() {
		for _, f := range childEnds {
			_ = f.Close()
		}
	}()
	if spec.stdin {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		childEnds = append(childEnds, r)
		cmd.Stdin, p.stdin = r, w
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		_ = outR.Close()
		_ = outW.Close()
		return nil, err
	}
	childEnds = append(childEnds, outW, errW)
	cmd.Stdout, cmd.Stderr = outW, errW
	if err := cmd.Start(); err != nil {
		_ = outR.Close()
		_ = errR.Close()
		if p.stdin != nil {
			_ = p.stdin.Close()
		}
		return nil, startError(spec, err)
	}
	p.closers = append(p.closers, outR, errR)
	p.copyOut(stdout, outR)
	p.copyOut(stderr, errR)
	return p, nil
}

func startError(spec *procSpec, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// The file exists (lookPath said so): its interpreter does not.
		return &exitError{code: exitNotFound, msg: fmt.Sprintf("%s: %v (is its interpreter missing?)", spec.argv[0], err)}
	case errors.Is(err, fs.ErrPermission):
		return cannotRun("%s: permission denied", spec.argv[0])
	}
	return cannotRun("start %s: %v", spec.argv[0], err)
}

func (p *process) copyOut(w io.Writer, r io.Reader) {
	p.outputs.Add(1)
	go func() {
		defer p.outputs.Done()
		_, _ = io.Copy(w, r) // a PTY ends with EIO once the last holder closes it
	}()
}

// wait waits for the process and for its output, giving children that keep
// the output open drainGrace, and returns its exit status.
func (p *process) wait() ExitStatus {
	err := p.cmd.Wait()
	p.mu.Lock()
	p.exited = true
	p.mu.Unlock()
	close(p.done)
	drained := make(chan struct{})
	go func() { p.outputs.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(drainGrace):
	}
	for _, c := range p.closers {
		_ = c.Close()
	}
	<-drained
	if p.stdin != nil && p.pty == nil {
		_ = p.stdin.Close()
	}
	st := p.cmd.ProcessState
	if st == nil {
		return ExitStatus{Code: exitCannotRun, Message: fmt.Sprintf("wait: %v", err)}
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return ExitStatus{Code: 128 + int(ws.Signal()), Signal: signalName(ws.Signal())}
	}
	return ExitStatus{Code: st.ExitCode()}
}

// signal sends sig to the process's group, unless it has been reaped.
func (p *process) signal(sig syscall.Signal) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited || p.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
}

// hangup ends a process whose host went away: SIGHUP to its group, then
// SIGKILL after hangupGrace.
func (p *process) hangup() {
	p.signal(syscall.SIGHUP)
	select {
	case <-p.done:
	case <-time.After(hangupGrace):
		p.signal(syscall.SIGKILL)
	}
}

func (p *process) resize(ws Winsize) {
	if p.pty != nil && ws.Rows > 0 && ws.Cols > 0 {
		_ = pty.Setsize(p.pty, &pty.Winsize{Rows: ws.Rows, Cols: ws.Cols})
	}
}

// closeStdin ends the input: a pipe is closed; a terminal gets its EOF
// character.
func (p *process) closeStdin() {
	if p.stdin == nil {
		return
	}
	if p.pty != nil {
		_, _ = p.pty.Write([]byte{4})
		return
	}
	_ = p.stdin.Close()
}

func signalName(sig syscall.Signal) string {
	names := map[syscall.Signal]string{
		syscall.SIGHUP: "SIGHUP", syscall.SIGINT: "SIGINT", syscall.SIGQUIT: "SIGQUIT", syscall.SIGKILL: "SIGKILL",
		syscall.SIGTERM: "SIGTERM", syscall.SIGSEGV: "SIGSEGV", syscall.SIGABRT: "SIGABRT", syscall.SIGPIPE: "SIGPIPE",
		syscall.SIGUSR1: "SIGUSR1", syscall.SIGUSR2: "SIGUSR2", syscall.SIGALRM: "SIGALRM", syscall.SIGBUS: "SIGBUS",
	}
	if n, ok := names[sig]; ok {
		return n
	}
	return "signal " + strconv.Itoa(int(sig))
}

// serveExec runs one command on an exec stream.
func (s *Server) serveExec(ctx context.Context, c net.Conn, req *ExecRequest) error {
	w := &msgWriter{w: c}
	spec, err := resolveExec(req)
	var p *process
	if err == nil {
		p, err = startProcess(spec, typedWriter{w, msgStdout}, typedWriter{w, msgStderr})
	}
	if err != nil {
		st := ExitStatus{Code: exitCannotRun, Message: err.Error()}
		var ee *exitError
		if errors.As(err, &ee) {
			st.Code = ee.code
		}
		_ = w.send(msgStderr, []byte("banger exec: "+st.Message+"\n"))
		return w.exit(st)
	}
	stopCtx := context.AfterFunc(ctx, p.hangup)
	defer stopCtx()
	inputDone := make(chan struct{})
	go func() {
		defer close(inputDone)
		s.execInput(c, p)
	}()
	st := p.wait()
	err = w.exit(st)
	// Wake the input reader: the host may keep its half open.
	_ = c.SetReadDeadline(time.Unix(1, 0))
	<-inputDone
	return err
}

// execInput forwards the host's messages to p until the stream ends. A
// stream that ends while p runs means the host went away: p is hung up.
func (s *Server) execInput(c net.Conn, p *process) {
	r := newMsgReader(c)
	for {
		t, payload, err := r.next()
		if err != nil {
			select {
			case <-p.done:
			default:
				// Output has nowhere to go: fail its writes at once.
				_ = c.SetWriteDeadline(time.Unix(1, 0))
				p.hangup()
			}
			return
		}
		switch t {
		case msgStdin:
			if p.stdin != nil {
				if _, err := p.stdin.Write(payload); err != nil {
					s.logf("exec stdin: %v", err)
				}
			}
		case msgStdinEOF:
			p.closeStdin()
		case msgResize:
			if ws, ok := decodeWinsize(payload); ok {
				p.resize(ws)
			}
		case msgSignal:
			if len(payload) == 1 && forwardable[syscall.Signal(payload[0])] {
				p.signal(syscall.Signal(payload[0]))
			}
		}
	}
}

// Host side.

// ExecIO is what RunExec connects to the remote process.
type ExecIO struct {
	// Stdin is forwarded until EOF, then the remote input is closed. Nil
	// sends nothing.
	Stdin io.Reader
	// Stdout and Stderr receive the remote output.
	Stdout, Stderr io.Writer
	// Resize and Signal carry terminal sizes and signals to forward.
	Resize <-chan Winsize
	Signal <-chan syscall.Signal
}

// RunExec speaks the exec stream protocol on c (a stream opened with
// OpExec, directly or relayed by the daemon) until the remote process
// exits, and returns its status. The stream ending first is
// ErrSessionLost. It closes c.
func RunExec(ctx context.Context, c io.ReadWriteCloser, eio ExecIO) (ExitStatus, error) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	w := &msgWriter{w: c}
	quit := make(chan struct{})
	defer close(quit)
	if eio.Stdin != nil {
		go func() {
			buf := make([]byte, 32<<10)
			for {
				n, err := eio.Stdin.Read(buf)
				if n > 0 {
					if w.send(msgStdin, buf[:n]) != nil {
						return
					}
				}
				if err != nil {
					_ = w.send(msgStdinEOF, nil)
					return
				}
			}
		}()
	}
	go func() {
		for {
			select {
			case <-quit:
				return
			case ws, ok := <-eio.Resize:
				if !ok {
					eio.Resize = nil
					continue
				}
				_ = w.send(msgResize, encodeWinsize(ws))
			case sig, ok := <-eio.Signal:
				if !ok {
					eio.Signal = nil
					continue
				}
				_ = w.send(msgSignal, []byte{byte(sig)})
			}
		}
	}()
	return readOutput(ctx, c, eio.Stdout, eio.Stderr)
}

// readOutput copies output messages until the exit message.
func readOutput(ctx context.Context, c io.Reader, stdout, stderr io.Writer) (ExitStatus, error) {
	r := newMsgReader(c)
	for {
		t, payload, err := r.next()
		if err != nil {
			if ctx.Err() != nil {
				return ExitStatus{}, ctx.Err()
			}
			return ExitStatus{}, fmt.Errorf("%w before the remote command finished: %v", ErrSessionLost, err) //nolint:errorlint // the kind is ErrSessionLost
		}
		switch t {
		case msgStdout:
			if stdout != nil {
				if _, err := stdout.Write(payload); err != nil {
					return ExitStatus{}, fmt.Errorf("write output: %w", err)
				}
			}
		case msgStderr:
			if stderr != nil {
				if _, err := stderr.Write(payload); err != nil {
					return ExitStatus{}, fmt.Errorf("write output: %w", err)
				}
			}
		case msgExit:
			var st ExitStatus
			if err := json.Unmarshal(payload, &st); err != nil {
				return ExitStatus{}, fmt.Errorf("undecodable exit status: %w", ErrBadFrame)
			}
			if st.Code < 0 || st.Code > 255 {
				return ExitStatus{}, fmt.Errorf("exit status %d out of range: %w", st.Code, ErrBadFrame)
			}
			return st, nil
		}
	}
}
