package portfwd

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// ServiceName is the agent service that answers port-forward streams.
const ServiceName = "port_forward"

// WireVersion is the stream protocol version; both ends refuse another.
const WireVersion = 1

// MaxLineSize bounds the request and reply lines.
const MaxLineSize = 1024

// MaxDatagram is the largest UDP payload carried (the uint16 length prefix).
const MaxDatagram = 65535

// DefaultHandshakeTimeout bounds the request/reply exchange when the caller's
// context has no deadline.
const DefaultHandshakeTimeout = 10 * time.Second

// Reply codes.
const (
	CodeRefused     = "refused"     // nothing listens on the guest port
	CodeUnreachable = "unreachable" // the dial failed for another reason
	CodeInvalid     = "invalid"     // the request was malformed
)

// Sentinel errors; test with errors.Is.
var (
	// ErrRefused: the guest has no service on the port.
	ErrRefused = errors.New("guest port refused the connection")
	// ErrProtocol: the peer broke the stream protocol.
	ErrProtocol = errors.New("port-forward protocol error")
)

// Streamer opens streams to a guest's agent services. The agent session
// implements it; the service for this package is ServiceName.
type Streamer interface {
	OpenService(ctx context.Context, service string) (net.Conn, error)
}

// request is the host's first line.
type request struct {
	V     int    `json:"v"`
	Proto Proto  `json:"proto"`
	Port  uint16 `json:"port"`
}

// reply is the guest's first line.
type reply struct {
	OK    bool   `json:"ok,omitempty"`
	Error string `json:"error,omitempty"`
	Code  string `json:"code,omitempty"`
}

func writeLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b)+1 > MaxLineSize {
		return fmt.Errorf("line of %d bytes exceeds %d: %w", len(b)+1, MaxLineSize, ErrProtocol)
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// readLine reads one '\n'-terminated JSON line byte by byte, so that nothing
// after it is consumed, and decodes it into v.
func readLine(r io.Reader, v any) error {
	var buf bytes.Buffer
	var b [1]byte
	for {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || (errors.Is(err, io.EOF) && buf.Len() > 0) {
				err = fmt.Errorf("stream ended mid-line: %w", ErrProtocol)
			}
			return err
		}
		if b[0] == '\n' {
			break
		}
		if buf.Len() >= MaxLineSize {
			return fmt.Errorf("line longer than %d bytes: %w", MaxLineSize, ErrProtocol)
		}
		buf.WriteByte(b[0])
	}
	if err := json.Unmarshal(buf.Bytes(), v); err != nil {
		return fmt.Errorf("undecodable line: %w", ErrProtocol)
	}
	return nil
}

// Dial opens a stream to the guest's port-forward service and asks it to
// connect to the guest's port over proto. On success the returned conn
// carries the connection (TCP bytes, or framed datagrams for UDP). A guest
// port with nothing listening gives an error wrapping ErrRefused.
func Dial(ctx context.Context, s Streamer, proto Proto, port uint16) (net.Conn, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultHandshakeTimeout)
		defer cancel()
	}
	c, err := s.OpenService(ctx, ServiceName)
	if err != nil {
		return nil, fmt.Errorf("open port-forward stream: %w", err)
	}
	if err := handshake(ctx, c, proto, port); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

func handshake(ctx context.Context, c net.Conn, proto Proto, port uint16) error {
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	fail := func(err error) error {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return fmt.Errorf("guest port %d/%s: %w", port, proto, err)
	}
	if err := writeLine(c, request{V: WireVersion, Proto: proto, Port: port}); err != nil {
		return fail(err)
	}
	var rep reply
	if err := readLine(c, &rep); err != nil {
		return fail(err)
	}
	if !stop() {
		return fail(ctx.Err())
	}
	_ = c.SetDeadline(time.Time{})
	switch {
	case rep.OK:
		return nil
	case rep.Code == CodeRefused:
		return fail(fmt.Errorf("%w: nothing listens on it in the guest", ErrRefused))
	default:
		return fail(fmt.Errorf("guest: %.200s (%.32s): %w", rep.Error, rep.Code, ErrProtocol))
	}
}

// writeDatagram writes one length-prefixed datagram.
func writeDatagram(w io.Writer, p []byte) error {
	if len(p) > MaxDatagram {
		return fmt.Errorf("datagram of %d bytes exceeds %d", len(p), MaxDatagram)
	}
	buf := make([]byte, 2+len(p))
	binary.BigEndian.PutUint16(buf, uint16(len(p)))
	copy(buf[2:], p)
	_, err := w.Write(buf)
	return err
}

// readDatagram reads one length-prefixed datagram into buf (which must hold
// MaxDatagram bytes) and returns its payload.
func readDatagram(r io.Reader, buf []byte) ([]byte, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if _, err := io.ReadFull(r, buf[:n]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf[:n], nil
}
