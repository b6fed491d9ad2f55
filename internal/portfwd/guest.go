package portfwd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
)

// DefaultGuestDialTimeout bounds the guest's dial of a guest port.
const DefaultGuestDialTimeout = 5 * time.Second

// Guest is the guest side of port forwarding: the agent hands it every
// stream opened to ServiceName. It dials the requested port on the guest's
// loopback first and then on the guest's own addresses, so services bound
// to 127.0.0.1, to 0.0.0.0 or only to the guest's IP are all reachable.
type Guest struct {
	// Log receives diagnostics; nil discards them.
	Log *slog.Logger
	// Addrs lists the guest's own addresses, tried after loopback; nil
	// lists the interfaces' addresses.
	Addrs func() []netip.Addr
	// DialTimeout bounds one dial; zero means DefaultGuestDialTimeout.
	DialTimeout time.Duration
}

func (g *Guest) log() *slog.Logger {
	if g.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return g.Log
}

// ServeStream answers one port-forward stream and relays it until either
// side ends or ctx is done. It closes c.
func (g *Guest) ServeStream(ctx context.Context, c net.Conn) error {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(DefaultHandshakeTimeout))
	var req request
	if err := readLine(c, &req); err != nil {
		return fmt.Errorf("port-forward request: %w", err)
	}
	_ = c.SetDeadline(time.Time{})
	refuse := func(code, msg string) error {
		_ = writeLine(c, reply{Error: msg, Code: code})
		return fmt.Errorf("port-forward to %d/%s: %s", req.Port, req.Proto, msg)
	}
	if req.V != WireVersion {
		return refuse(CodeInvalid, fmt.Sprintf("guest speaks port-forward v%d, request is v%d", WireVersion, req.V))
	}
	if req.Port == 0 {
		return refuse(CodeInvalid, "port 0")
	}
	switch req.Proto {
	case TCP:
		conn, err := g.dialTCP(ctx, req.Port)
		if err != nil {
			code := CodeUnreachable
			if errors.Is(err, syscall.ECONNREFUSED) {
				code = CodeRefused
			}
			return refuse(code, err.Error())
		}
		if err := writeLine(c, reply{OK: true}); err != nil {
			_ = conn.Close()
			return err
		}
		relay(ctx, c, conn)
		return nil
	case UDP:
		conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), req.Port)))
		if err != nil {
			return refuse(CodeUnreachable, err.Error())
		}
		if err := writeLine(c, reply{OK: true}); err != nil {
			_ = conn.Close()
			return err
		}
		g.relayUDP(ctx, c, conn)
		return nil
	default:
		return refuse(CodeInvalid, fmt.Sprintf("protocol %.16q", req.Proto))
	}
}

// dialTCP tries loopback, then the guest's own addresses; it returns the
// first connection or, when every address refuses, ECONNREFUSED.
func (g *Guest) dialTCP(ctx context.Context, port uint16) (net.Conn, error) {
	timeout := g.DialTimeout
	if timeout <= 0 {
		timeout = DefaultGuestDialTimeout
	}
	addrs := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
	if g.Addrs != nil {
		addrs = append(addrs, g.Addrs()...)
	} else {
		addrs = append(addrs, interfaceAddrs()...)
	}
	d := net.Dialer{Timeout: timeout}
	var first error
	for _, a := range addrs {
		conn, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(a, port).String())
		if err == nil {
			return conn, nil
		}
		if first == nil || (!errors.Is(err, syscall.ECONNREFUSED) && errors.Is(first, syscall.ECONNREFUSED)) {
			first = err
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, first
}

// interfaceAddrs lists the guest's non-loopback unicast addresses.
func interfaceAddrs() []netip.Addr {
	ifas, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, ia := range ifas {
		pfx, err := netip.ParsePrefix(ia.String())
		if err != nil || pfx.Addr().IsLoopback() || pfx.Addr().IsLinkLocalUnicast() {
			continue
		}
		out = append(out, pfx.Addr())
	}
	return out
}

// relayUDP carries framed datagrams between the stream and the guest's
// connected UDP socket until the stream ends or ctx is done.
func (g *Guest) relayUDP(ctx context.Context, c net.Conn, conn *net.UDPConn) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		_ = c.Close()
		_ = conn.Close()
	})
	defer stop()
	go func() {
		defer cancel()
		buf := make([]byte, MaxDatagram)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				// ICMP port unreachable from an earlier send: keep going.
				if errors.Is(err, syscall.ECONNREFUSED) {
					continue
				}
				return
			}
			if err := writeDatagram(c, buf[:n]); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, MaxDatagram)
	for {
		p, err := readDatagram(c, buf)
		if err != nil {
			return
		}
		if _, err := conn.Write(p); err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
			g.log().Debug("udp write to guest port", "err", err)
			if errors.Is(err, os.ErrClosed) {
				return
			}
		}
	}
}
