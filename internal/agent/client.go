package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// Client defaults.
const (
	// DefaultRequestTimeout bounds a request whose ctx has no deadline.
	DefaultRequestTimeout = 10 * time.Second
	// DefaultHelloRetry is how often a serial client repeats its hello
	// while waiting for the agent's echo.
	DefaultHelloRetry = 200 * time.Millisecond
	// firstHelloRetry is the first repeat interval; each repeat doubles it
	// up to HelloRetry.
	firstHelloRetry = 20 * time.Millisecond
)

// ClientOptions tune NewClient.
type ClientOptions struct {
	// Resync marks a virtio-serial stream: skip garbage and stale replies
	// instead of failing on them, and repeat the hello until answered.
	Resync bool
	// RequestTimeout bounds a request whose ctx has no deadline; zero
	// means DefaultRequestTimeout.
	RequestTimeout time.Duration
	// HelloRetry is the serial hello repeat interval; zero means
	// DefaultHelloRetry.
	HelloRetry time.Duration
	// FrameTimeout is how long a started frame may take to complete on a
	// serial stream before it is dropped as garbage; zero means
	// DefaultFrameTimeout.
	FrameTimeout time.Duration
}

// Client is the host side of an agent connection. Its methods are safe for
// concurrent use; requests are sent one at a time.
type Client struct {
	conn net.Conn
	fc   *framedConn
	opts ClientOptions

	mu     sync.Mutex
	nextID uint64
	sess   *yamux.Session // set once upgraded (mux.go)
	tooOld bool           // the agent refused OpMux
}

// NewClient wraps an established connection and says hello: the agent must
// echo a fresh random nonce in the same protocol version. On a resync
// stream every frame before that echo is discarded. The caller keeps
// ownership of conn on error.
func NewClient(ctx context.Context, conn net.Conn, opts ClientOptions) (*Client, error) {
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = DefaultRequestTimeout
	}
	if opts.HelloRetry <= 0 {
		opts.HelloRetry = DefaultHelloRetry
	}
	if opts.FrameTimeout <= 0 {
		opts.FrameTimeout = DefaultFrameTimeout
	}
	// On a serial stream, a half frame left by an earlier session is dropped
	// after FrameTimeout instead of holding up this one.
	c := &Client{conn: conn, fc: newFramedConn(conn, opts.Resync, opts.FrameTimeout), opts: opts, nextID: 1}
	var raw [16]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return nil, fmt.Errorf("hello nonce: %w", err)
	}
	nonce := hex.EncodeToString(raw[:])
	resp, err := c.callFramed(ctx, Request{Op: OpHello, Nonce: nonce}, func(r *Response) bool {
		return r.Hello != nil && r.Hello.Nonce == nonce
	})
	if err != nil {
		return nil, err
	}
	if resp.Hello == nil || resp.Hello.Nonce != nonce {
		return nil, fmt.Errorf("hello: agent echoed the wrong nonce: %w", ErrBadFrame)
	}
	return c, nil
}

// Close ends the session (every open stream with it) and closes the
// connection.
func (c *Client) Close() error {
	c.mu.Lock()
	sess := c.sess
	c.mu.Unlock()
	if sess != nil {
		_ = sess.Close()
	}
	return c.conn.Close()
}

// Health asks for the agent's version, uptime and the guest hostname.
func (c *Client) Health(ctx context.Context) (*Health, error) {
	resp, err := c.call(ctx, Request{Op: OpHealth}, nil)
	if err != nil {
		return nil, err
	}
	if resp.Health == nil {
		return nil, fmt.Errorf("health: reply without result: %w", ErrBadFrame)
	}
	return resp.Health, nil
}

// Status asks for first-boot progress, the guest addresses and SSH host key.
// Everything in it comes from the guest and is untrusted.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	resp, err := c.call(ctx, Request{Op: OpStatus}, nil)
	if err != nil {
		return nil, err
	}
	if resp.Status == nil {
		return nil, fmt.Errorf("status: reply without result: %w", ErrBadFrame)
	}
	return resp.Status, nil
}

// Shutdown asks the guest to power off cleanly and returns how it will.
// The guest may go away before or after the reply arrives.
func (c *Client) Shutdown(ctx context.Context) (string, error) {
	resp, err := c.call(ctx, Request{Op: OpShutdown}, nil)
	if err != nil {
		return "", err
	}
	if resp.Shutdown == nil {
		return "", fmt.Errorf("shutdown: reply without result: %w", ErrBadFrame)
	}
	return resp.Shutdown.Method, nil
}

// AuthorizeKey installs one SSH public key (an authorized_keys line without
// options) into the guest root's authorized_keys and reports whether it was
// added (false: already there). The key is validated here first.
func (c *Client) AuthorizeKey(ctx context.Context, key string) (bool, error) {
	if _, _, err := ParseAuthorizedKeyLine(key); err != nil {
		return false, fmt.Errorf("authorize_key: %w", err)
	}
	resp, err := c.call(ctx, Request{Op: OpAuthorizeKey, Key: key}, nil)
	if err != nil {
		return false, err
	}
	if resp.Key == nil {
		return false, fmt.Errorf("authorize_key: reply without result: %w", ErrBadFrame)
	}
	return resp.Key.Added, nil
}

// call sends req and waits for its reply: on a stream of its own once the
// connection is multiplexed, else as one framed exchange.
func (c *Client) call(ctx context.Context, req Request, match func(*Response) bool) (*Response, error) {
	c.mu.Lock()
	sess := c.sess
	if sess == nil {
		defer c.mu.Unlock()
		return c.callFramed(ctx, req, match)
	}
	c.mu.Unlock()
	return c.callStream(ctx, sess, req)
}

// callFramed sends req and waits for the reply with its id (and, if match
// is set, for which match holds). On a resync stream a hello is resent every
// HelloRetry until answered. The caller holds c.mu.
func (c *Client) callFramed(ctx context.Context, req Request, match func(*Response) bool) (*Response, error) {
	req.V = ProtocolVersion
	req.ID = c.nextID
	c.nextID++

	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(c.opts.RequestTimeout)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	fail := func(err error) (*Response, error) {
		switch {
		case ctx.Err() != nil:
			err = ctx.Err()
		case errors.Is(err, os.ErrDeadlineExceeded) && ok:
			// ctx's own deadline, seen by the socket a moment first.
			err = fmt.Errorf("no reply by the deadline: %w", context.DeadlineExceeded)
		case errors.Is(err, os.ErrDeadlineExceeded):
			err = fmt.Errorf("no reply within %s: %w", c.opts.RequestTimeout, err)
		}
		return nil, fmt.Errorf("agent %s: %w", req.Op, err)
	}
	if err := c.fc.send(req, deadline); err != nil {
		return fail(err)
	}
	repeat := c.opts.Resync && req.Op == OpHello
	// The first repeats come sooner (firstHelloRetry, doubling up to
	// HelloRetry): an agent that is already up but dropped the first hello
	// (a guest restored from a snapshot leaves its old session on it)
	// answers within tens of milliseconds, not a whole HelloRetry.
	retry := min(firstHelloRetry, c.opts.HelloRetry)
	for {
		wait := deadline
		if repeat {
			wait = minTime(deadline, time.Now().Add(retry))
			retry = min(2*retry, c.opts.HelloRetry)
		}
		payload, err := c.fc.fr.next(ctx, wait)
		if err != nil {
			if repeat && errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil && time.Now().Before(deadline) {
				if err := c.fc.send(req, deadline); err != nil {
					return fail(err)
				}
				continue
			}
			return fail(err)
		}
		var env envelope
		if err := json.Unmarshal(payload, &env); err != nil {
			if c.opts.Resync {
				continue
			}
			return fail(fmt.Errorf("undecodable reply: %w", ErrBadFrame))
		}
		if env.V != ProtocolVersion {
			return fail(fmt.Errorf("agent speaks protocol v%d, this banger speaks v%d: rebuild the image with the agent of this banger release: %w",
				env.V, ProtocolVersion, ErrVersionMismatch))
		}
		if env.ID != req.ID {
			continue // a late reply to an earlier, abandoned request
		}
		var resp Response
		if err := json.Unmarshal(payload, &resp); err != nil {
			if c.opts.Resync {
				continue
			}
			return fail(fmt.Errorf("undecodable reply: %w", ErrBadFrame))
		}
		if resp.Error != nil {
			return fail(resp.Error)
		}
		if match != nil && !match(&resp) {
			continue
		}
		return &resp, nil
	}
}

// decodeReply decodes the reply to request id on a stream (strict: there
// is nothing stale on a fresh stream).
func decodeReply(payload []byte, id uint64) (*Response, error) {
	var env envelope
	if err := json.Unmarshal(payload, &env); err != nil {
		return nil, fmt.Errorf("undecodable reply: %w", ErrBadFrame)
	}
	if env.V != ProtocolVersion {
		return nil, fmt.Errorf("agent speaks protocol v%d, this banger speaks v%d: %w", env.V, ProtocolVersion, ErrVersionMismatch)
	}
	if env.ID != id {
		return nil, fmt.Errorf("reply to request %d on the stream of request %d: %w", env.ID, id, ErrBadFrame)
	}
	var resp Response
	if err := json.Unmarshal(payload, &resp); err != nil {
		return nil, fmt.Errorf("undecodable reply: %w", ErrBadFrame)
	}
	if resp.Error != nil {
		return nil, resp.Error
	}
	return &resp, nil
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// DialFunc opens a client; WaitHealthy calls it once per attempt.
type DialFunc func(ctx context.Context) (*Client, error)

// DefaultAttemptTimeout bounds one WaitHealthy attempt (dial, hello,
// health).
const DefaultAttemptTimeout = 5 * time.Second

// WaitHealthy dials and asks for health every interval until an attempt
// succeeds or ctx is done. progress, if set, is called after every failed
// attempt. A version mismatch ends the wait at once.
func WaitHealthy(ctx context.Context, dial DialFunc, interval time.Duration, progress func(attempt int, err error)) (*Health, error) {
	for attempt := 1; ; attempt++ {
		h, err := tryHealth(ctx, dial)
		if err == nil {
			return h, nil
		}
		if errors.Is(err, ErrVersionMismatch) {
			return nil, err
		}
		if progress != nil {
			progress(attempt, err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("agent not healthy after %d attempts: %w (last error: %w)", attempt, ctx.Err(), err)
		case <-time.After(interval):
		}
	}
}

func tryHealth(ctx context.Context, dial DialFunc) (*Health, error) {
	ctx, cancel := context.WithTimeout(ctx, DefaultAttemptTimeout)
	defer cancel()
	c, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.Health(ctx)
}
