package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"

	"github.com/bangerdev/banger/internal/progress"
)

// Client talks to the daemon over its Unix socket.
type Client struct {
	Socket string
	http   *http.Client
	dial   func(ctx context.Context) (net.Conn, error)
}

// NewClient returns a client for the daemon listening on socket.
func NewClient(socket string) *Client {
	return NewClientDialer(socket, func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	})
}

// NewClientDialer returns a client that connects to the daemon with dial
// (tests use it to connect as another uid); socket names it in errors.
func NewClientDialer(socket string, dial func(ctx context.Context) (net.Conn, error)) *Client {
	tr := &http.Transport{
		DialContext:        func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
		MaxIdleConns:       4,
		DisableCompression: true,
	}
	return &Client{Socket: socket, http: &http.Client{Transport: tr}, dial: dial}
}

// unavailable turns a dial failure into an error that says how to start the
// daemon.
func (c *Client) unavailable(err error) error {
	why := "cannot connect"
	switch {
	case errors.Is(err, syscall.ENOENT):
		why = "no socket at that path"
	case errors.Is(err, syscall.ECONNREFUSED):
		why = "nothing is listening (stale socket)"
	case errors.Is(err, syscall.EACCES):
		return Errorf(CodeForbidden, "permission denied on the banger socket %s: add your user to the 'banger' group (sudo usermod -aG banger $USER, then log in again) or use sudo", c.Socket)
	}
	return Errorf(CodeUnavailable, "the banger daemon is not running (%s: %s).\nStart it with 'sudo systemctl start banger' or run 'sudo banger daemon' in another terminal; use --socket or BANGER_SOCKET if it listens elsewhere", c.Socket, why)
}

func (c *Client) request(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if r, ok := in.(io.Reader); ok {
		body, in = r, nil
	} else if in != nil {
		raw, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(raw)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://banger"+Prefix+path, body)
	if err != nil {
		return nil, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	} else if body != nil {
		req.Header.Set("Content-Type", "application/x-tar")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, Errorf(CodeCanceled, "canceled: %v", ctx.Err())
		}
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return nil, c.unavailable(err)
		}
		return nil, Errorf(CodeInternal, "%s %s: %v", method, path, err)
	}
	return resp, nil
}

func decodeError(resp *http.Response) error {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var e Error
	if json.Unmarshal(raw, &e) == nil && e.Code != "" {
		return &e
	}
	return Errorf(CodeInternal, "daemon answered %s: %s", resp.Status, strings.TrimSpace(string(raw)))
}

// Do sends a request with in as the JSON body (nil for none) and decodes the
// JSON answer into out (nil to discard).
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.request(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeError(resp)
	}
	if strings.HasPrefix(resp.Header.Get("Content-Type"), StreamContentType) {
		return readStream(ctx, resp.Body, nil, out)
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return Errorf(CodeInternal, "decode answer to %s %s: %v", method, path, err)
	}
	return nil
}

// Raw sends a request and returns the answer's body unparsed (for the
// console log). The caller closes it.
func (c *Client) Raw(ctx context.Context, method, path string) (io.ReadCloser, error) {
	resp, err := c.request(ctx, method, path, nil)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		return nil, decodeError(resp)
	}
	return resp.Body, nil
}

// StreamBody is Stream with a raw request body (an upload).
func (c *Client) StreamBody(ctx context.Context, method, path string, body io.Reader, onEvent progress.Func, out any) error {
	return c.Stream(ctx, method, path, body, onEvent, out)
}

// Stream sends a request whose answer is an NDJSON stream, passes each
// progress event to onEvent and decodes the final result into out.
// Canceling ctx closes the connection, which cancels the operation in the
// daemon.
func (c *Client) Stream(ctx context.Context, method, path string, in any, onEvent progress.Func, out any) error {
	resp, err := c.request(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeError(resp)
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), StreamContentType) {
		if out == nil {
			return nil
		}
		return json.NewDecoder(resp.Body).Decode(out)
	}
	return readStream(ctx, resp.Body, onEvent, out)
}

func readStream(ctx context.Context, r io.Reader, onEvent progress.Func, out any) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var line StreamLine
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			return Errorf(CodeInternal, "bad stream line from daemon: %v", err)
		}
		switch {
		case line.Event != nil:
			onEvent.Report(*line.Event)
		case line.Error != nil:
			return line.Error
		case line.Result != nil:
			if out != nil {
				if err := json.Unmarshal(line.Result, out); err != nil {
					return Errorf(CodeInternal, "decode result: %v", err)
				}
			}
			return nil
		}
	}
	if ctx.Err() != nil {
		return Errorf(CodeCanceled, "canceled: %v", ctx.Err())
	}
	if err := sc.Err(); err != nil {
		return Errorf(CodeInternal, "stream from daemon broke: %v", err)
	}
	return Errorf(CodeInternal, "the daemon closed the stream without a result (did it crash? see its log: journalctl -u banger)")
}
