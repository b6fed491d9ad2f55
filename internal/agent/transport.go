package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// Transport names a way for the host to reach a guest's agent.
type Transport string

// Transports Dial knows.
const (
	// TransportVsockUDS is Firecracker's vsock: addr is the device's
	// uds_path; the host sends "CONNECT <port>\n" and reads "OK <port>\n".
	TransportVsockUDS Transport = "vsock-uds"
	// TransportVsock is a kernel AF_VSOCK socket: addr is "CID" or
	// "CID:PORT".
	TransportVsock Transport = "vsock"
	// TransportVirtioSerial is QEMU's Unix-socket chardev behind the
	// virtio-serial port SerialPortName: addr is the socket path.
	TransportVirtioSerial Transport = "virtio-serial"
)

// DefaultDialTimeout bounds Dial when ctx has no deadline.
const DefaultDialTimeout = 10 * time.Second

// Dial connects to the agent over transport at addr (see the Transport
// constants for addr's form), says hello, and returns a client. The guest
// port is DefaultPort.
func Dial(ctx context.Context, transport Transport, addr string) (*Client, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultDialTimeout)
		defer cancel()
	}
	var (
		conn net.Conn
		err  error
		opts ClientOptions
	)
	switch transport {
	case TransportVsockUDS:
		conn, err = ConnectVsockUDS(ctx, addr, DefaultPort)
	case TransportVsock:
		var cid, port uint32
		if cid, port, err = parseVsockAddr(addr); err == nil {
			conn, err = DialVsock(ctx, cid, port)
		}
	case TransportVirtioSerial:
		var d net.Dialer
		conn, err = d.DialContext(ctx, "unix", addr)
		opts.Resync = true
	default:
		return nil, fmt.Errorf("dial agent over %q: %w", transport, ErrUnknownTransport)
	}
	if err != nil {
		return nil, fmt.Errorf("dial agent over %s at %s: %w", transport, addr, err)
	}
	c, err := NewClient(ctx, conn, opts)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("agent over %s at %s: %w", transport, addr, err)
	}
	return c, nil
}

func parseVsockAddr(addr string) (cid, port uint32, err error) {
	cidStr, portStr, hasPort := strings.Cut(addr, ":")
	c, err := strconv.ParseUint(cidStr, 10, 32)
	if err != nil {
		return 0, 0, fmt.Errorf("vsock address %q: bad CID: %w", addr, ErrInvalidArgument)
	}
	port = DefaultPort
	if hasPort {
		p, err := strconv.ParseUint(portStr, 10, 32)
		if err != nil {
			return 0, 0, fmt.Errorf("vsock address %q: bad port: %w", addr, ErrInvalidArgument)
		}
		port = uint32(p)
	}
	return uint32(c), port, nil
}

// ConnectVsockUDS opens a host-initiated connection to guest vsock port
// through a Firecracker vsock Unix socket at udsPath: it sends
// "CONNECT <port>\n" and expects "OK <hostport>\n". Firecracker closes the
// socket when nothing listens on the port; that returns ErrConnectRefused.
func ConnectVsockUDS(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", udsPath)
	if err != nil {
		return nil, fmt.Errorf("connect to vsock socket %s: %w", udsPath, err)
	}
	fail := func(err error) (net.Conn, error) {
		_ = c.Close()
		return nil, fmt.Errorf("vsock CONNECT %d via %s: %w", port, udsPath, err)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(DefaultDialTimeout)
	}
	if err := c.SetDeadline(deadline); err != nil {
		return fail(err)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		return fail(err)
	}
	// Read byte by byte: what follows the newline belongs to the agent.
	var line []byte
	b := make([]byte, 1)
	for {
		n, err := c.Read(b)
		if n == 1 {
			if b[0] == '\n' {
				break
			}
			line = append(line, b[0])
			if len(line) > 32 {
				return fail(fmt.Errorf("answer %q is too long: %w", line, ErrBadFrame))
			}
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return fail(ctx.Err())
			}
			if len(line) == 0 && !isTimeout(err) {
				return fail(fmt.Errorf("closed without an answer (no agent listening yet?): %w", ErrConnectRefused))
			}
			return fail(fmt.Errorf("read answer after %q: %w", line, err))
		}
	}
	rest, ok := bytes.CutPrefix(line, []byte("OK "))
	if !ok {
		return fail(fmt.Errorf("answer %q is not OK <port>: %w", line, ErrBadFrame))
	}
	if _, err := strconv.ParseUint(string(rest), 10, 32); err != nil {
		return fail(fmt.Errorf("answer %q has no port number: %w", line, ErrBadFrame))
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		return fail(err)
	}
	return c, nil
}

func isTimeout(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded)
}
