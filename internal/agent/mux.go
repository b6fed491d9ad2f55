package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// StreamVersion is the version of the stream services (exec, copy, ssh)
// carried over the yamux session. An agent reports it in its Mux reply.
const StreamVersion = 1

// Mux timings. The keepalive is what notices an agent that died while the
// host end of a virtio-serial port stays connected (QEMU keeps the chardev
// open): a ping unanswered for muxPingTimeout ends the session, and every
// stream on it fails instead of hanging.
const (
	muxKeepAlive   = 3 * time.Second
	muxPingTimeout = 5 * time.Second
	muxOpenTimeout = 10 * time.Second
	// muxWindow is the per-stream receive window. The default 256 KiB
	// caps a copy at one window per round trip; a serial port under TCG has
	// a round trip of a few milliseconds.
	muxWindow = 4 << 20
	// streamHeaderTimeout bounds reading the request that opens a stream.
	streamHeaderTimeout = 10 * time.Second
)

// More sentinel errors.
var (
	// ErrAgentTooOld: the agent predates the stream services (exec, cp,
	// ssh over the agent channel).
	ErrAgentTooOld = errors.New("agent too old: it has no exec, cp or ssh service; re-pull the image or `banger image refresh-agent IMAGE`, then make the VM again from it")
	// ErrSessionLost: the multiplexed session to the agent ended (the
	// agent died, the guest stopped, or the host end closed it).
	ErrSessionLost = errors.New("the connection to the guest agent was lost")
)

func muxConfig(l *log.Logger) *yamux.Config {
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = true
	cfg.KeepAliveInterval = muxKeepAlive
	cfg.ConnectionWriteTimeout = muxPingTimeout
	cfg.StreamOpenTimeout = muxOpenTimeout
	cfg.StreamCloseTimeout = 30 * time.Second
	cfg.MaxStreamWindowSize = muxWindow
	cfg.LogOutput = nil
	cfg.Logger = l
	if l == nil {
		cfg.Logger = log.New(io.Discard, "", 0)
	}
	return cfg
}

// muxConn is the byte stream yamux runs on: the bytes a frame reader had
// already buffered, then the connection itself. Closing it closes the
// connection, or, for a serial port that outlives the session, only wakes
// a blocked read.
type muxConn struct {
	r     io.Reader
	w     io.Writer
	close func() error
}

func (m *muxConn) Read(p []byte) (int, error)  { return m.r.Read(p) }
func (m *muxConn) Write(p []byte) (int, error) { return m.w.Write(p) }
func (m *muxConn) Close() error                { return m.close() }

// muxReadBuffer is the read buffer under yamux's own 4 KiB one on a
// connection whose reads return what has arrived (a socket): fewer reads
// for small frames.
const muxReadBuffer = 256 << 10

// newMuxConn wraps rw for yamux, reading through a buffer of readBuf
// bytes (0: none). A virtio-serial port gets none: a read of the port
// returns at most one 4 KiB receive buffer of the guest's driver, so a
// larger buffer saves no read and costs a copy of every byte (a third of
// the guest agent's copying for a mount's reads under TCG). yamux's own
// buffer holds frame headers; frame bodies are read straight into the
// stream's buffer.
func newMuxConn(rw io.ReadWriter, buffered []byte, closeFn func() error, readBuf int) *muxConn {
	var r io.Reader = rw
	if readBuf > 0 {
		r = bufio.NewReaderSize(rw, readBuf)
	}
	if len(buffered) > 0 {
		r = io.MultiReader(bytes.NewReader(buffered), r)
	}
	return &muxConn{r: r, w: rw, close: closeFn}
}

// takeBuffered returns and drops the bytes read past the last frame.
func (fr *frameReader) takeBuffered() []byte {
	b := bytes.Clone(fr.buf[fr.start:fr.end])
	fr.start, fr.end = 0, 0
	fr.pendingAt = time.Time{}
	return b
}

// bufferedConn is a stream whose first bytes were read ahead by a frame
// reader.
type bufferedConn struct {
	net.Conn
	r io.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// CloseWrite half-closes the stream (yamux streams close only their
// sending half on Close).
func (b *bufferedConn) CloseWrite() error { return b.Close() }

func withBuffered(c net.Conn, fr *frameReader) net.Conn {
	rest := fr.takeBuffered()
	if len(rest) == 0 {
		return &bufferedConn{Conn: c, r: c}
	}
	return &bufferedConn{Conn: c, r: io.MultiReader(bytes.NewReader(rest), c)}
}

// serveMux runs a yamux server session on rw until the host ends it, the
// connection fails, or ctx is done. Every stream is served by its own
// goroutine; serveMux returns once all of them have ended (their processes
// killed), so that nothing started by this session outlives it.
func (s *Server) serveMux(ctx context.Context, rw io.ReadWriter, buffered []byte, closeFn func() error, readBuf int) error {
	var streams sync.WaitGroup
	defer streams.Wait()
	return s.runMux(ctx, rw, buffered, closeFn, readBuf, &streams)
}

// runMux is serveMux without the wait for the session's streams: it
// returns once the session is closed (nothing of it reads or writes rw any
// more) and adds each stream's goroutine to streams.
func (s *Server) runMux(ctx context.Context, rw io.ReadWriter, buffered []byte, closeFn func() error, readBuf int, streams *sync.WaitGroup) error {
	sess, err := yamux.Server(newMuxConn(rw, buffered, closeFn, readBuf), muxConfig(s.Log))
	if err != nil {
		return fmt.Errorf("start mux session: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { _ = sess.Close() })
	defer stop()
	wg := streams
	defer sess.Close()
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, io.EOF) || errors.Is(err, yamux.ErrSessionShutdown) {
				return nil
			}
			return fmt.Errorf("mux session: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer st.Close()
			if err := s.serveStream(ctx, st); err != nil {
				s.logf("stream %d: %v", st.StreamID(), err)
			}
		}()
	}
}

// serveStream reads the request that opens a stream and serves it.
func (s *Server) serveStream(ctx context.Context, st *yamux.Stream) error {
	fc := newFramedConn(st, false, 0)
	payload, err := fc.fr.next(ctx, time.Now().Add(streamHeaderTimeout))
	if err != nil {
		return fmt.Errorf("read stream request: %w", err)
	}
	_ = st.SetReadDeadline(time.Time{})
	resp, ok := s.handlePayload(ctx, payload)
	if !ok {
		return fmt.Errorf("undecodable stream request: %w", ErrBadFrame)
	}
	svc := s.streamService(resp)
	if resp.Error != nil || svc == nil {
		return fc.send(resp, s.writeDeadline())
	}
	if err := fc.send(resp, s.writeDeadline()); err != nil {
		return err
	}
	_ = st.SetWriteDeadline(time.Time{})
	return svc(ctx, withBuffered(st, fc.fr))
}

// Client side.

// mux returns the client's yamux session, upgrading the connection on first
// use. An agent that does not know OpMux gets ErrAgentTooOld, and the
// client keeps using the framed protocol.
func (c *Client) mux(ctx context.Context) (*yamux.Session, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sess != nil {
		if c.sess.IsClosed() {
			return nil, ErrSessionLost
		}
		return c.sess, nil
	}
	if c.tooOld {
		return nil, ErrAgentTooOld
	}
	resp, err := c.callFramed(ctx, Request{Op: OpMux}, nil)
	if errors.Is(err, ErrUnknownOp) {
		c.tooOld = true
		return nil, ErrAgentTooOld
	}
	if err != nil {
		return nil, err
	}
	if resp.Mux == nil || resp.Mux.Streams != StreamVersion {
		c.tooOld = true
		return nil, fmt.Errorf("agent stream protocol %v, this banger speaks v%d: %w", resp.Mux, StreamVersion, ErrAgentTooOld)
	}
	if err := c.conn.SetDeadline(time.Time{}); err != nil && !errors.Is(err, os.ErrNoDeadline) {
		return nil, fmt.Errorf("clear deadline: %w", err)
	}
	sess, err := yamux.Client(newMuxConn(c.conn, c.fc.fr.takeBuffered(), c.conn.Close, muxReadBuffer), muxConfig(nil))
	if err != nil {
		return nil, fmt.Errorf("start mux session: %w", err)
	}
	c.sess = sess
	return sess, nil
}

// Upgrade turns the connection into a multiplexed session now (it happens
// on first use otherwise). It returns ErrAgentTooOld for an agent without
// stream services.
func (c *Client) Upgrade(ctx context.Context) error {
	_, err := c.mux(ctx)
	return err
}

// Done is closed when the multiplexed session has ended; nil before
// Upgrade.
func (c *Client) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sess == nil {
		return nil
	}
	return c.sess.CloseChan()
}

// OpenStream opens a stream for one of the stream operations (OpExec,
// OpCopyIn, OpCopyOut, OpSSH) and returns it once the agent has accepted
// the request. The caller closes it; closing it ends the guest side (an
// exec'd process gets SIGHUP).
func (c *Client) OpenStream(ctx context.Context, req Request) (net.Conn, error) {
	switch req.Op {
	case OpExec, OpCopyIn, OpCopyOut, OpSSH:
	default:
		return nil, fmt.Errorf("open stream for %q: not a stream operation: %w", req.Op, ErrInvalidArgument)
	}
	sess, err := c.mux(ctx)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", req.Op, err)
	}
	st, fr, _, err := c.streamRequest(ctx, sess, req)
	if err != nil {
		return nil, err
	}
	return withBuffered(st, fr), nil
}

// streamRequest opens a stream, sends req and reads the agent's reply.
func (c *Client) streamRequest(ctx context.Context, sess *yamux.Session, req Request) (*yamux.Stream, *frameReader, *Response, error) {
	req.V = ProtocolVersion
	c.mu.Lock()
	req.ID = c.nextID
	c.nextID++
	c.mu.Unlock()
	fail := func(err error) (*yamux.Stream, *frameReader, *Response, error) {
		switch {
		case ctx.Err() != nil:
			err = ctx.Err()
		case sess.IsClosed():
			err = fmt.Errorf("%w: %w", ErrSessionLost, err)
		}
		return nil, nil, nil, fmt.Errorf("agent %s: %w", req.Op, err)
	}
	st, err := sess.OpenStream()
	if err != nil {
		return fail(err)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(c.opts.RequestTimeout)
	}
	stop := context.AfterFunc(ctx, func() { _ = st.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	fc := newFramedConn(st, false, 0)
	if err := fc.send(req, deadline); err != nil {
		_ = st.Close()
		return fail(err)
	}
	payload, err := fc.fr.next(ctx, deadline)
	if err != nil {
		_ = st.Close()
		return fail(err)
	}
	resp, err := decodeReply(payload, req.ID)
	if err != nil {
		_ = st.Close()
		return fail(err)
	}
	if err := st.SetDeadline(time.Time{}); err != nil {
		_ = st.Close()
		return fail(err)
	}
	return st, fc.fr, resp, nil
}

// callStream answers a framed request on a stream of its own.
func (c *Client) callStream(ctx context.Context, sess *yamux.Session, req Request) (*Response, error) {
	st, _, resp, err := c.streamRequest(ctx, sess, req)
	if err != nil {
		return nil, err
	}
	_ = st.Close()
	return resp, nil
}
