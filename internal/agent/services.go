package agent

import (
	"context"
	"fmt"
	"net"
)

// StreamService serves one stream of a service registered in
// Server.Services: it owns c, a raw byte stream once the agent has accepted
// the request that named the service, and returns when it is done with it.
// The service speaks its own protocol on c (internal/portfwd,
// internal/mounts); the agent knows only its name.
type StreamService func(ctx context.Context, c net.Conn) error

// OpenService opens a stream to the guest service named service (a key of
// the agent's Server.Services) over the multiplexed session. An agent
// without that service answers with an error wrapping ErrUnknownOp; one
// without streams at all gives ErrAgentTooOld. The caller closes the
// stream; CloseWrite half-closes it.
func (c *Client) OpenService(ctx context.Context, service string) (net.Conn, error) {
	switch service {
	case OpHello, OpHealth, OpStatus, OpAuthorizeKey, OpShutdown, OpMux, OpSetIdentity, OpExec, OpCopyIn, OpCopyOut, OpSSH, "":
		return nil, fmt.Errorf("open service %q: a built-in operation, not a service: %w", service, ErrInvalidArgument)
	}
	sess, err := c.mux(ctx)
	if err != nil {
		return nil, fmt.Errorf("agent service %s: %w", service, err)
	}
	st, fr, _, err := c.streamRequest(ctx, sess, Request{Op: service})
	if err != nil {
		return nil, err
	}
	return withBuffered(st, fr), nil
}
