package agent

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
)

// # Stream services
//
// A stream opened with OpExec, OpCopyIn or OpCopyOut carries messages:
//
//	type uint8 | length uint32 BE | payload (at most maxMessage bytes)
//
// Host to guest: msgStdin (bytes for the process, or the tar stream of a
// copy in), msgStdinEOF, msgResize (rows, cols as two uint16 BE) and
// msgSignal (one byte: the signal number). Guest to host: msgStdout (the
// process's output, or the tar stream of a copy out), msgStderr and, last,
// msgExit (an ExitStatus in JSON). A stream opened with OpSSH carries the
// SSH protocol itself (sshd.go).
const (
	msgStdin    byte = 1
	msgStdinEOF byte = 2
	msgResize   byte = 3
	msgSignal   byte = 4
	msgStdout   byte = 16
	msgStderr   byte = 17
	msgExit     byte = 18
)

// maxMessage is the largest message payload either end accepts.
const maxMessage = 64 << 10

// ExecRequest is the command of an OpExec stream.
type ExecRequest struct {
	// Argv is the command and its arguments; Argv[0] is looked up in the
	// guest's PATH unless it contains a slash.
	Argv []string `json:"argv"`
	// TTY gives the process a pseudo-terminal of Rows x Cols.
	TTY  bool   `json:"tty,omitempty"`
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
	// Term is TERM for a TTY ("xterm" when empty).
	Term string `json:"term,omitempty"`
	// Stdin keeps the process's standard input open; without it the
	// process reads /dev/null.
	Stdin bool `json:"stdin,omitempty"`
	// User is the guest user name or uid to run as ("" : root).
	User string `json:"user,omitempty"`
	// Dir is the working directory (default: the user's home, else /).
	Dir string `json:"dir,omitempty"`
	// Env holds KEY=VALUE pairs added to the default environment.
	Env []string `json:"env,omitempty"`
}

// CopyRequest names the guest side of a copy.
type CopyRequest struct {
	// Path is the guest path, resolved inside the guest; a relative path
	// is relative to the user's home.
	Path string `json:"path"`
	// User owns what a copy in creates, unless KeepOwner; it also
	// resolves a relative Path ("": root).
	User string `json:"user,omitempty"`
	// KeepOwner keeps the uid and gid recorded in the tar stream (the
	// daemon sets it only for a root caller).
	KeepOwner bool `json:"keep_owner,omitempty"`
}

// ExitStatus ends an exec or copy stream.
type ExitStatus struct {
	// Code is the process's exit status, 128+N when signal N killed it,
	// 126 when it could not be started, 127 when it was not found. A copy
	// reports 0 or 1.
	Code int `json:"code"`
	// Signal names the signal that killed the process, if one did.
	Signal string `json:"signal,omitempty"`
	// Message says why a command could not start or a copy failed.
	Message string `json:"message,omitempty"`
}

// Limits on a stream request.
const (
	maxArgs     = 4096
	maxArgBytes = 256 << 10
)

// checkStream validates the request opening a stream.
func (s *Server) checkStream(req Request) error {
	switch req.Op {
	case OpExec:
		e := req.Exec
		if e == nil || len(e.Argv) == 0 || e.Argv[0] == "" {
			return errors.New("exec: no command given")
		}
		if len(e.Argv)+len(e.Env) > maxArgs {
			return fmt.Errorf("exec: more than %d arguments and variables", maxArgs)
		}
		n := 0
		for _, a := range append(append([]string{}, e.Argv...), e.Env...) {
			if strings.ContainsRune(a, 0) {
				return errors.New("exec: an argument or variable contains a NUL byte")
			}
			n += len(a)
		}
		if n > maxArgBytes {
			return fmt.Errorf("exec: arguments and variables exceed %d bytes", maxArgBytes)
		}
		for _, kv := range e.Env {
			if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
				return fmt.Errorf("exec: environment entry %q is not KEY=VALUE", truncate(kv, 64))
			}
		}
		if strings.ContainsRune(e.User+e.Dir+e.Term, 0) {
			return errors.New("exec: user, dir or term contains a NUL byte")
		}
	case OpCopyIn, OpCopyOut:
		c := req.Copy
		if c == nil || c.Path == "" {
			return errors.New("copy: no guest path given")
		}
		if strings.ContainsRune(c.Path+c.User, 0) {
			return errors.New("copy: path or user contains a NUL byte")
		}
	}
	return nil
}

// framedOnly refuses a stream operation outside a mux session.
func framedOnly(resp *Response) *Response {
	switch resp.Op {
	case OpExec, OpCopyIn, OpCopyOut, OpSSH:
		if resp.Error == nil {
			return errorResponse(resp.ID, resp.Op, CodeInvalidArgument, "stream operations need a mux session (send mux first)")
		}
	}
	return resp
}

// streamService returns the service of an accepted stream request, nil for
// a plain request.
func (s *Server) streamService(resp *Response) func(context.Context, net.Conn) error {
	if resp.Error != nil {
		return nil
	}
	switch resp.Op {
	case OpExec:
		req := resp.pending
		return func(ctx context.Context, c net.Conn) error { return s.serveExec(ctx, c, req.Exec) }
	case OpCopyIn:
		req := resp.pending
		return func(ctx context.Context, c net.Conn) error { return s.serveCopyIn(ctx, c, req.Copy) }
	case OpCopyOut:
		req := resp.pending
		return func(ctx context.Context, c net.Conn) error { return s.serveCopyOut(ctx, c, req.Copy) }
	case OpSSH:
		return s.serveSSH
	}
	if svc := s.Services[resp.Op]; svc != nil {
		return svc
	}
	return nil
}

// msgWriter sends messages; it is safe for concurrent use.
type msgWriter struct {
	mu  sync.Mutex
	w   io.Writer
	err error
}

func (m *msgWriter) send(t byte, p []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return m.err
	}
	for {
		n := min(len(p), maxMessage)
		buf := make([]byte, 5+n)
		buf[0] = t
		binary.BigEndian.PutUint32(buf[1:5], uint32(n)) //nolint:gosec // n <= maxMessage
		copy(buf[5:], p[:n])
		if _, err := m.w.Write(buf); err != nil {
			m.err = err
			return err
		}
		p = p[n:]
		if len(p) == 0 {
			return nil
		}
	}
}

func (m *msgWriter) exit(st ExitStatus) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return m.send(msgExit, b)
}

// Write sends p as msgStdout (or the type the writer was made for).
type typedWriter struct {
	m *msgWriter
	t byte
}

func (w typedWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if err := w.m.send(w.t, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// msgReader reads messages.
type msgReader struct {
	r   *bufio.Reader
	buf []byte
}

func newMsgReader(r io.Reader) *msgReader {
	return &msgReader{r: bufio.NewReaderSize(r, 64<<10), buf: make([]byte, maxMessage)}
}

// next returns the next message; the payload is valid until the next call.
func (m *msgReader) next() (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(m.r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > maxMessage {
		return 0, nil, fmt.Errorf("stream message of %d bytes (max %d): %w", n, maxMessage, ErrFrameTooLarge)
	}
	p := m.buf[:n]
	if _, err := io.ReadFull(m.r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return hdr[0], p, nil
}

// Winsize is a terminal size.
type Winsize struct {
	Rows, Cols uint16
}

func encodeWinsize(w Winsize) []byte {
	var b [4]byte
	binary.BigEndian.PutUint16(b[0:2], w.Rows)
	binary.BigEndian.PutUint16(b[2:4], w.Cols)
	return b[:]
}

func decodeWinsize(p []byte) (Winsize, bool) {
	if len(p) != 4 {
		return Winsize{}, false
	}
	return Winsize{Rows: binary.BigEndian.Uint16(p[0:2]), Cols: binary.BigEndian.Uint16(p[2:4])}, true
}

// forwardable are the signals a host may send to an exec'd process.
var forwardable = map[syscall.Signal]bool{
	syscall.SIGHUP: true, syscall.SIGINT: true, syscall.SIGQUIT: true, syscall.SIGTERM: true,
	syscall.SIGKILL: true, syscall.SIGUSR1: true, syscall.SIGUSR2: true, syscall.SIGWINCH: true,
	syscall.SIGCONT: true, syscall.SIGSTOP: true, syscall.SIGTSTP: true, syscall.SIGALRM: true,
}
