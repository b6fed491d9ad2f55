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
	"time"
)

// StreamProtocol is the Upgrade token of the endpoints that turn the API
// connection into a byte stream to the guest agent (exec, cp, ssh).
const StreamProtocol = "banger-agent-stream"

// ExecRequest is the body of POST /v1/vms/{name}/exec.
type ExecRequest struct {
	Argv  []string `json:"argv"`
	TTY   bool     `json:"tty,omitempty"`
	Rows  uint16   `json:"rows,omitempty"`
	Cols  uint16   `json:"cols,omitempty"`
	Term  string   `json:"term,omitempty"`
	Stdin bool     `json:"stdin,omitempty"`
	User  string   `json:"user,omitempty"`
	Dir   string   `json:"dir,omitempty"`
	Env   []string `json:"env,omitempty"`
}

// CopyRequest is the body of POST /v1/vms/{name}/cp/in and /cp/out.
type CopyRequest struct {
	// Path is the guest path; a relative one is relative to User's home.
	Path string `json:"path"`
	User string `json:"user,omitempty"`
}

// Upgrade sends a POST with in as the JSON body, asking the daemon to turn
// the connection into a stream; on 101 Switching Protocols it returns the
// connection, now carrying the agent's stream protocol. Any other answer is
// decoded as an API error.
func (c *Client) Upgrade(ctx context.Context, path string, in any) (net.Conn, error) {
	body, err := json.Marshal(in)
	if err != nil {
		return nil, fmt.Errorf("encode request: %w", err)
	}
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, c.unavailable(err)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://banger"+Prefix+path, bytes.NewReader(body))
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", StreamProtocol)
	if err := req.Write(conn); err != nil {
		_ = conn.Close()
		return nil, Errorf(CodeInternal, "POST %s: %v", path, err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		_ = conn.Close()
		if ctx.Err() != nil {
			return nil, Errorf(CodeCanceled, "canceled: %v", ctx.Err())
		}
		return nil, Errorf(CodeInternal, "POST %s: %v", path, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer conn.Close()
		return nil, decodeError(resp)
	}
	if ctx.Err() != nil {
		_ = conn.Close()
		return nil, Errorf(CodeCanceled, "canceled: %v", ctx.Err())
	}
	_ = conn.SetDeadline(time.Time{})
	return &upgradedConn{Conn: conn, r: br}, nil
}

// upgradedConn reads what the response reader had buffered first.
type upgradedConn struct {
	net.Conn
	r io.Reader
}

func (u *upgradedConn) Read(p []byte) (int, error) { return u.r.Read(p) }

// CloseWrite half-closes the connection (the daemon then ends the sending
// half of the guest side), for relays that carry TCP's half-close.
func (u *upgradedConn) CloseWrite() error {
	if cw, ok := u.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("this connection cannot half-close")
}
