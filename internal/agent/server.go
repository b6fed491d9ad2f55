package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"sync"
	"time"
)

// Server defaults.
const (
	DefaultIdleTimeout    = 2 * time.Minute
	DefaultFrameTimeout   = 3 * time.Second
	DefaultWriteTimeout   = 10 * time.Second
	DefaultHandlerTimeout = 10 * time.Second
	// maxConns bounds concurrent connections on a listener.
	maxConns = 16
)

// Server answers agent requests. It is the guest side of the protocol;
// cmd/banger-vsock-agent runs one with Root "/". Tests run it against a
// temporary directory.
type Server struct {
	// Root is the guest root filesystem every guest path is relative to.
	Root string
	// Version is reported by health.
	Version string
	// Log receives diagnostics; nil discards them.
	Log *log.Logger
	// IdleTimeout closes a connection that sends no request for this long
	// (connection transports only; a serial port is never closed).
	IdleTimeout time.Duration
	// FrameTimeout is how long a frame that has started may take to arrive
	// completely on a serial port before it is discarded as garbage.
	FrameTimeout time.Duration
	// WriteTimeout bounds writing one reply.
	WriteTimeout time.Duration
	// HandlerTimeout bounds answering one request.
	HandlerTimeout time.Duration
	// Hostname returns the guest hostname; nil uses os.Hostname.
	Hostname func() (string, error)
	// Addresses returns the guest's IPv4 addresses; nil lists the
	// interfaces' non-loopback IPv4 addresses.
	Addresses func() ([]InterfaceAddr, error)
	// PowerOff starts a clean power-off of the guest shortly after it
	// returns (so the reply can be sent) and says how. Nil refuses
	// shutdown requests; cmd/banger-vsock-agent sets it.
	PowerOff func() (method string, err error)
	// Services are further stream services by operation name (port
	// forwarding, host folders: services.go); the guest program sets them.
	Services map[string]StreamService
	// SFTPServer is the argv of a program serving SFTP on its stdin and
	// stdout (the guest program's sftp-server mode), which the SSH server
	// runs as the login user for the sftp subsystem of anyone but the
	// agent's own user. Nil: the image's sftp-server.
	SFTPServer []string
	// SerialEOFBackoff is how long to wait after a serial port reports that
	// no host is connected before reading again.
	SerialEOFBackoff time.Duration

	started time.Time
	keyMu   sync.Mutex // serialises authorized_keys updates
	hostMu  sync.Mutex // serialises making the SSH host key (apart: authorizing a key never waits for a key being made)
}

// NewServer returns a Server for the guest root root, reporting version.
func NewServer(root, version string) *Server {
	return &Server{
		Root:             root,
		Version:          version,
		IdleTimeout:      DefaultIdleTimeout,
		FrameTimeout:     DefaultFrameTimeout,
		WriteTimeout:     DefaultWriteTimeout,
		HandlerTimeout:   DefaultHandlerTimeout,
		SerialEOFBackoff: 250 * time.Millisecond,
		started:          time.Now(),
	}
}

func (s *Server) logf(format string, args ...any) {
	if s.Log != nil {
		s.Log.Printf(format, args...)
	}
}

// Serve accepts connections on l and serves each until ctx is done, then
// closes l and every connection and returns ctx's error.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { _ = l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, maxConns)
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept on %s: %w", l.Addr(), err)
		}
		select {
		case sem <- struct{}{}:
		default:
			s.logf("refusing connection from %s: %d connections open", c.RemoteAddr(), maxConns)
			_ = c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := s.ServeConn(ctx, c); err != nil {
				s.logf("connection from %s: %v", c.RemoteAddr(), err)
			}
		}()
	}
}

// ServeConn serves one connection in strict mode until the peer closes it,
// it stays idle for IdleTimeout, it sends a malformed frame, or ctx is done.
// It closes c. A clean close or idle timeout returns nil.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	fc := newFramedConn(c, false, 0)
	for {
		idle := time.Time{}
		if s.IdleTimeout > 0 {
			idle = time.Now().Add(s.IdleTimeout)
		}
		payload, err := fc.fr.next(ctx, idle)
		switch {
		case err == nil:
		case errors.Is(err, io.EOF), ctx.Err() != nil:
			return nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			s.logf("closing idle connection from %s", c.RemoteAddr())
			return nil
		default:
			return err
		}
		resp, ok := s.handlePayload(ctx, payload)
		if !ok {
			return fmt.Errorf("undecodable request: %w", ErrBadFrame)
		}
		resp = framedOnly(resp)
		if err := fc.send(resp, s.writeDeadline()); err != nil {
			return err
		}
		if resp.Mux != nil {
			if err := c.SetDeadline(time.Time{}); err != nil && !errors.Is(err, os.ErrNoDeadline) {
				return fmt.Errorf("clear deadline: %w", err)
			}
			return s.serveMux(ctx, c, fc.fr.takeBuffered(), c.Close, muxReadBuffer)
		}
	}
}

// ServeStream serves a virtio-serial port (or any byte stream without
// connection semantics) in resync mode until ctx is done or a read fails
// for a reason other than "no host connected". An EOF means the host side
// is not connected: buffered bytes are dropped and reading resumes after
// SerialEOFBackoff. To interrupt a blocked read on ctx cancellation, rw
// should support SetReadDeadline (an *os.File on a pollable device does).
func (s *Server) ServeStream(ctx context.Context, rw io.ReadWriter) error {
	if d, ok := rw.(readDeadliner); ok {
		stop := context.AfterFunc(ctx, func() { _ = d.SetReadDeadline(time.Unix(1, 0)) })
		defer stop()
	}
	fc := newFramedConn(rw, true, s.FrameTimeout)
	for {
		payload, err := fc.fr.next(ctx, time.Time{})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, io.EOF) {
			fc.fr.reset()
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(s.SerialEOFBackoff):
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("read serial stream: %w", err)
		}
		resp, ok := s.handlePayload(ctx, payload)
		if !ok {
			s.logf("discarding undecodable frame of %d bytes", len(payload))
			continue
		}
		resp = framedOnly(resp)
		if err := fc.send(resp, s.writeDeadline()); err != nil {
			// The host went away mid-reply; it will say hello again.
			s.logf("reply to %s #%d: %v", resp.Op, resp.ID, err)
			continue
		}
		if resp.Mux != nil {
			s.serveSerialMux(ctx, rw, fc)
		}
	}
}

// serveSerialMux runs a mux session on a serial port until the host
// disconnects (EOF), the keepalive fails or ctx ends, then leaves the port
// ready for framed requests again: the next host says hello first. It does
// not wait for the session's streams to wind down (a killed command gets
// up to 2 s): closed with their session, they no longer touch the port,
// and the next host (a restored guest's first, whose hello ended the
// session it was saved with) is answered at once.
func (s *Server) serveSerialMux(ctx context.Context, rw io.ReadWriter, fc *framedConn) {
	wake := func() error {
		if d, ok := rw.(readDeadliner); ok {
			_ = d.SetReadDeadline(time.Unix(1, 0))
		}
		return nil
	}
	if d, ok := rw.(writeDeadliner); ok {
		_ = d.SetWriteDeadline(time.Time{})
	}
	var streams sync.WaitGroup
	if err := s.runMux(ctx, rw, fc.fr.takeBuffered(), wake, 0, &streams); err != nil {
		s.logf("serial mux session: %v", err)
	}
	s.logf("serial mux session ended")
	fc.fr.reset()
}

func (s *Server) writeDeadline() time.Time {
	if s.WriteTimeout <= 0 {
		return time.Time{}
	}
	return time.Now().Add(s.WriteTimeout)
}

// envelope is the part of a message every protocol version keeps.
type envelope struct {
	V  int    `json:"v"`
	ID uint64 `json:"id"`
	Op string `json:"op"`
}

// handlePayload decodes and answers one request. ok is false when the
// payload is not a request at all.
func (s *Server) handlePayload(ctx context.Context, payload []byte) (resp *Response, ok bool) {
	var env envelope
	if err := json.Unmarshal(payload, &env); err != nil {
		return nil, false
	}
	if env.V != ProtocolVersion {
		return errorResponse(env.ID, env.Op, CodeVersionMismatch,
			fmt.Sprintf("agent speaks protocol v%d, request is v%d: use a banger and agent of the same release", ProtocolVersion, env.V)), true
	}
	var req Request
	if err := json.Unmarshal(payload, &req); err != nil {
		return errorResponse(env.ID, env.Op, CodeInvalidArgument, "undecodable request: "+err.Error()), true
	}
	if s.HandlerTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.HandlerTimeout)
		defer cancel()
	}
	return s.Handle(ctx, req), true
}

func errorResponse(id uint64, op, code, msg string) *Response {
	return &Response{V: ProtocolVersion, ID: id, Op: op, Error: &RemoteError{Code: code, Message: msg}}
}

// Handle answers one decoded request.
func (s *Server) Handle(ctx context.Context, req Request) *Response {
	if req.V != ProtocolVersion {
		return errorResponse(req.ID, req.Op, CodeVersionMismatch,
			fmt.Sprintf("agent speaks protocol v%d, request is v%d", ProtocolVersion, req.V))
	}
	resp := &Response{V: ProtocolVersion, ID: req.ID, Op: req.Op}
	switch req.Op {
	case OpHello:
		if len(req.Nonce) > 128 {
			return errorResponse(req.ID, req.Op, CodeInvalidArgument, "nonce longer than 128 bytes")
		}
		resp.Hello = &Hello{Nonce: req.Nonce}
	case OpHealth:
		resp.Health = s.health()
	case OpMux:
		resp.Mux = &Mux{Streams: StreamVersion}
	case OpExec, OpCopyIn, OpCopyOut, OpSSH:
		if err := s.checkStream(req); err != nil {
			return errorResponse(req.ID, req.Op, CodeInvalidArgument, err.Error())
		}
		resp.pending = &req
	case OpStatus:
		resp.Status = s.status(ctx)
	case OpAuthorizeKey:
		added, err := s.authorizeKey(req.Key)
		if err != nil {
			code := CodeInternal
			if errors.Is(err, ErrInvalidArgument) {
				code = CodeInvalidArgument
			}
			s.logf("authorize_key: %v", err)
			return errorResponse(req.ID, req.Op, code, err.Error())
		}
		resp.Key = &AuthorizeKey{Added: added}
	case OpShutdown:
		if s.PowerOff == nil {
			return errorResponse(req.ID, req.Op, CodeUnknownOp, "this agent does not power the guest off")
		}
		method, err := s.PowerOff()
		if err != nil {
			s.logf("shutdown: %v", err)
			return errorResponse(req.ID, req.Op, CodeInternal, err.Error())
		}
		resp.Shutdown = &Shutdown{Method: method}
	case OpSetIdentity:
		res, err := s.setIdentity(req.Identity)
		if err != nil {
			code := CodeInternal
			if errors.Is(err, ErrInvalidArgument) {
				code = CodeInvalidArgument
			}
			s.logf("set_identity: %v", err)
			return errorResponse(req.ID, req.Op, code, err.Error())
		}
		resp.Identity = res
	default:
		if _, ok := s.Services[req.Op]; ok {
			resp.pending = &req // served on its stream (services.go)
			break
		}
		return errorResponse(req.ID, req.Op, CodeUnknownOp, fmt.Sprintf("unknown operation %q", truncate(req.Op, 64)))
	}
	return resp
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
