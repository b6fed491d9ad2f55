package mounts

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Caller is the identity a mount server runs as: the user who asked for
// the mount (from SO_PEERCRED), with that process's supplementary groups.
type Caller struct {
	UID, GID uint32
	Groups   []uint32
}

// CallerOf reads the supplementary groups of the process pid (the peer of
// the daemon's socket) and returns its identity with uid and gid, which
// come from SO_PEERCRED. A process that is gone gives an error: the daemon
// refuses the mount rather than guess the groups.
func CallerOf(pid int32, uid, gid uint32) (Caller, error) {
	c := Caller{UID: uid, GID: gid}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return c, fmt.Errorf("read the groups of caller pid %d: %w", pid, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "Groups:")
		if !ok {
			continue
		}
		for _, f := range strings.Fields(rest) {
			g, err := strconv.ParseUint(f, 10, 32)
			if err != nil {
				return c, fmt.Errorf("groups of caller pid %d: bad entry %q", pid, f)
			}
			c.Groups = append(c.Groups, uint32(g))
		}
		return c, nil
	}
	return c, fmt.Errorf("groups of caller pid %d: no Groups line", pid)
}

// Launcher starts mount server processes: Command is the program and its
// leading arguments (the daemon uses its own executable with the hidden
// "mount-server" subcommand, whose main calls ServerMain).
type Launcher struct {
	Command []string
	// Env is added to the server's otherwise empty environment.
	Env []string
}

func (l Launcher) cmd(ctx context.Context, caller Caller, s Spec, extra ...string) *exec.Cmd {
	args := append(append([]string{}, l.Command[1:]...), "--root", s.HostDir)
	if s.ReadOnly {
		args = append(args, "--ro")
	}
	args = append(args, extra...)
	cmd := exec.CommandContext(ctx, l.Command[0], args...)
	cmd.Env = append([]string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}, l.Env...)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: caller.UID, Gid: caller.GID, Groups: caller.Groups},
		Pdeathsig:  syscall.SIGKILL,
		Setsid:     true,
	}
	return cmd
}

// Check runs the server in check mode as caller: it resolves the folder's
// symlinks and checks the caller may read it (and write it unless :ro).
// The error carries the server's one-line reason.
func (l Launcher) Check(ctx context.Context, caller Caller, s Spec) error {
	cmd := l.cmd(ctx, caller, s, "--check")
	var stderr bytes.Buffer
	cmd.Stderr = &limitedWriter{w: &stderr, n: 4096}
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return fmt.Errorf("mount %s: %s: %w", s, msg, ErrAccess)
	}
	return nil
}

// ErrAccess means the caller may not use the host folder as asked.
var ErrAccess = errors.New("host folder refused")

// Process is a running mount server.
type Process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Start runs a mount server as caller, serving SFTP on stream (the agent
// stream to the guest's FUSE mount) through a socket pair, until either
// end closes or ctx is done. Its stderr goes to log.
func (l Launcher) Start(ctx context.Context, caller Caller, s Spec, stream io.ReadWriteCloser, log io.Writer) (*Process, error) {
	return l.StartReads(ctx, caller, s, stream, nil, log)
}

// StartReads is Start that also serves the folder's read stream (DialReads)
// when reads is not nil, from the same server process.
func (l Launcher) StartReads(ctx context.Context, caller Caller, s Spec, stream, reads io.ReadWriteCloser, log io.Writer) (*Process, error) {
	streams := []io.ReadWriteCloser{stream}
	if reads != nil {
		streams = append(streams, reads)
	}
	var children, parents []*os.File
	closeAll := func() {
		for _, f := range append(children, parents...) {
			_ = f.Close()
		}
	}
	for range streams {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("mount %s: socket pair: %w", s, err)
		}
		children = append(children, os.NewFile(uintptr(fds[1]), "mount-server"))
		parents = append(parents, os.NewFile(uintptr(fds[0]), "mount-daemon"))
	}
	args := []string{"--fd", "3"}
	if reads != nil {
		args = append(args, "--reads-fd", "4")
	}
	cmd := l.cmd(ctx, caller, s, args...)
	cmd.ExtraFiles = children
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		closeAll()
		return nil, fmt.Errorf("mount %s: start server: %w", s, err)
	}
	var conns []net.Conn
	for i, parent := range parents {
		_ = children[i].Close()
		conn, err := net.FileConn(parent)
		_ = parent.Close()
		if err != nil {
			for _, c := range conns {
				_ = c.Close()
			}
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return nil, fmt.Errorf("mount %s: %w", s, err)
		}
		conns = append(conns, conn)
	}
	p := &Process{cmd: cmd, done: make(chan struct{})}
	go func() {
		var wg sync.WaitGroup
		for i, conn := range conns {
			relay(&wg, conn, streams[i])
		}
		p.err = cmd.Wait()
		for i, conn := range conns {
			_ = conn.Close()
			_ = streams[i].Close()
		}
		wg.Wait()
		close(p.done)
	}()
	return p, nil
}

// relay copies between a server's socket and its agent stream, both ways.
func relay(wg *sync.WaitGroup, conn net.Conn, stream io.ReadWriteCloser) {
	wg.Add(2)
	// Large buffers: each read of the server's socket becomes one
	// agent-channel frame, and a guest under TCG pays per frame.
	go func() {
		defer wg.Done()
		_, _ = io.CopyBuffer(conn, onlyReader{stream}, make([]byte, relayBuffer))
		_ = conn.Close()
	}()
	go func() {
		defer wg.Done()
		_, _ = io.CopyBuffer(stream, onlyReader{conn}, make([]byte, relayBuffer))
		_ = stream.Close()
	}()
}

// relayBuffer is the relay's copy buffer: a server reply of a 128 KiB
// read and its header in one frame, where io.Copy's 32 KiB made five.
const relayBuffer = 256 << 10

// onlyReader hides a reader's WriterTo and ReaderFrom, so io.CopyBuffer
// uses the buffer it is given.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

// Pid is the server's process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Stop kills the server and waits for it and its relay to end.
func (p *Process) Stop() error {
	_ = p.cmd.Process.Kill()
	<-p.done
	return nil
}

// Wait waits for the server to end and returns how it ended.
func (p *Process) Wait() error {
	<-p.done
	return p.err
}

type limitedWriter struct {
	w io.Writer
	n int
}

func (l *limitedWriter) Write(b []byte) (int, error) {
	n := len(b)
	if len(b) > l.n {
		b = b[:l.n]
	}
	l.n -= len(b)
	_, _ = l.w.Write(b)
	return n, nil
}

// ServerMain is the mount server process: "--root DIR [--ro] (--check |
// --fd N)". It runs with the caller's credentials (Launcher sets them) and
// refuses to go on if it can gain privileges. It returns the exit status.
func ServerMain(args []string, stderr io.Writer) int {
	fl := flag.NewFlagSet("mount-server", flag.ContinueOnError)
	fl.SetOutput(stderr)
	root := fl.String("root", "", "host folder")
	ro := fl.Bool("ro", false, "read-only")
	check := fl.Bool("check", false, "only check access and exit")
	fd := fl.Int("fd", -1, "descriptor of the SFTP stream")
	readsFD := fl.Int("reads-fd", -1, "descriptor of the read stream (none: -1)")
	if err := fl.Parse(args); err != nil {
		return 2
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fmt.Fprintf(stderr, "mount server: no_new_privs: %v\n", err)
		return 1
	}
	r, err := OpenRoot(*root, *ro)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer r.Close()
	if *check {
		return 0
	}
	if *fd < 3 {
		fmt.Fprintln(stderr, "mount server: --fd is required")
		return 2
	}
	if *readsFD >= 3 && *readsFD != *fd {
		rf := os.NewFile(uintptr(*readsFD), "reads")
		go func() {
			if err := ServeReads(rf, r); err != nil {
				fmt.Fprintf(stderr, "mount server %s: read stream: %v\n", r.Dir(), err)
			}
		}()
	}
	f := os.NewFile(uintptr(*fd), "sftp")
	if err := Serve(f, r); err != nil {
		fmt.Fprintf(stderr, "mount server %s: %v\n", r.Dir(), err)
		return 1
	}
	return 0
}
