package daemon

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/portfwd"
)

// handleVMPortForward is POST /v1/vms/{name}/port-forward: one TCP
// connection of `banger port-forward`, whose listener the CLI holds as the
// calling user. The daemon authorizes the caller for the VM (its owner or
// root; anyone else gets "not found"), opens a port-forward stream on the
// VM's agent session for the one port the body names (the guest chooses
// the address: loopback, then its own), and relays. No record is kept: the
// forward lives as long as the CLI's connections.
func (d *Daemon) handleVMPortForward(w http.ResponseWriter, r *http.Request) {
	var req api.PortForwardRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	if req.Port == 0 {
		d.writeError(w, r, invalid("port-forward: guest port 0: name the guest port to reach (1-65535)"))
		return
	}
	d.relayWith(w, r, portfwd.ServiceName, func(ctx context.Context, vm model.VM) (net.Conn, error) {
		c, release, err := d.agentSession(ctx, vm)
		if err != nil {
			return nil, api.Errorf(api.CodeConflict, "VM %q: cannot reach its guest agent: %v", vm.Name, err)
		}
		st, err := portfwd.Dial(ctx, c, portfwd.TCP, req.Port)
		switch {
		case err == nil:
			return &releasingConn{Conn: st, release: func() { release(nil) }}, nil
		case errors.Is(err, portfwd.ErrRefused):
			release(nil)
			return nil, api.Errorf(api.CodeConflict, "VM %q: %v", vm.Name, err)
		case errors.Is(err, agent.ErrUnknownOp), errors.Is(err, agent.ErrAgentTooOld):
			release(nil)
			return nil, api.Errorf(api.CodeConflict, "VM %q: its guest agent has no port-forward service: re-pull the image (banger image pull) to install this banger's agent", vm.Name)
		}
		release(err)
		return nil, api.Errorf(api.CodeConflict, "VM %q: %v", vm.Name, err)
	}, pipeHalfClose)
}

// pipeHalfClose relays as a TCP proxy does (portfwd.Relay): when one
// direction reaches EOF the other end's sending half is closed, so a
// client that shuts down writing still gets its answer; it ends when both
// directions have, or either fails.
func pipeHalfClose(client net.Conn, clientR io.Reader, stream net.Conn) {
	portfwd.Relay(context.Background(), &readerConn{Conn: client, r: clientR}, stream)
}

// readerConn is the hijacked API connection read through what the HTTP
// server had buffered.
type readerConn struct {
	net.Conn
	r io.Reader
}

func (c *readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func (c *readerConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("this connection cannot half-close")
}

// CloseWrite ends the stream's sending half (an agent stream closes only
// that half on CloseWrite), keeping the session held until Close.
func (r *releasingConn) CloseWrite() error {
	if cw, ok := r.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("this stream cannot half-close")
}
