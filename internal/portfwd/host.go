package portfwd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Host-side defaults.
const (
	// DefaultUDPIdleTimeout ends a UDP peer's session after this long
	// without a datagram either way.
	DefaultUDPIdleTimeout = 60 * time.Second
	// DefaultMaxUDPSessions bounds concurrent UDP peers per listener; a
	// datagram from a new peer beyond it is dropped.
	DefaultMaxUDPSessions = 256
	// udpQueue is how many datagrams wait per peer while its stream opens.
	udpQueue = 64
)

// Errors from Listen; test with errors.Is.
var (
	// ErrPortInUse: the host address is already bound.
	ErrPortInUse = errors.New("host port already in use")
	// ErrPermission: the host refused the bind (a privileged port).
	ErrPermission = errors.New("not allowed to bind host port")
)

// Options tune a Listener; the zero value uses the defaults.
type Options struct {
	// Log receives diagnostics; nil discards them.
	Log *slog.Logger
	// UDPIdleTimeout; zero means DefaultUDPIdleTimeout.
	UDPIdleTimeout time.Duration
	// MaxUDPSessions; zero means DefaultMaxUDPSessions.
	MaxUDPSessions int
}

// Listener is the bound host side of one Spec.
type Listener struct {
	spec Spec
	opts Options
	tcp  *net.TCPListener
	udp  *net.UDPConn

	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]struct{}
	served sync.WaitGroup
}

// Listen binds spec's host side. A spec with HostPort 0 gets a free port;
// Spec reports it. A busy address gives an error wrapping ErrPortInUse.
func Listen(spec Spec, opts Options) (*Listener, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.UDPIdleTimeout <= 0 {
		opts.UDPIdleTimeout = DefaultUDPIdleTimeout
	}
	if opts.MaxUDPSessions <= 0 {
		opts.MaxUDPSessions = DefaultMaxUDPSessions
	}
	if !spec.HostIP.IsValid() || spec.GuestPort == 0 {
		return nil, fmt.Errorf("%w: %v: host address and guest port are required", ErrInvalidSpec, spec)
	}
	l := &Listener{spec: spec, opts: opts, conns: map[net.Conn]struct{}{}}
	addr := spec.HostAddr()
	var err error
	switch spec.Proto {
	case TCP:
		l.tcp, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(addr))
		if err == nil {
			l.spec.HostPort = uint16(l.tcp.Addr().(*net.TCPAddr).Port)
		}
	case UDP:
		l.udp, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		if err == nil {
			l.spec.HostPort = uint16(l.udp.LocalAddr().(*net.UDPAddr).Port)
		}
	default:
		return nil, fmt.Errorf("%w: protocol %q", ErrInvalidSpec, spec.Proto)
	}
	if err != nil {
		return nil, bindError(spec, err)
	}
	return l, nil
}

func bindError(spec Spec, err error) error {
	where := fmt.Sprintf("%s/%s", spec.HostAddr(), spec.Proto)
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("publish %s: %w: choose another host port, or 0 for any free one", where, ErrPortInUse)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("publish %s: %w: ports below 1024 need root", where, ErrPermission)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("publish %s: %s is not an address of this host: %w", where, spec.HostIP, err)
	}
	return fmt.Errorf("publish %s: %w", where, err)
}

// Spec is the listener's spec with the bound host port.
func (l *Listener) Spec() Spec { return l.spec }

// DialFunc opens the guest side of one forwarded connection (TCP) or UDP
// peer: a conn that carries its bytes (or framed datagrams), as Dial
// returns. An error resets the host connection.
type DialFunc func(ctx context.Context, proto Proto, port uint16) (net.Conn, error)

// StreamDialer is the DialFunc of a Streamer: Dial on one of its streams.
func StreamDialer(s Streamer) DialFunc {
	return func(ctx context.Context, proto Proto, port uint16) (net.Conn, error) {
		return Dial(ctx, s, proto, port)
	}
}

// Serve forwards every connection (TCP) or peer (UDP) through s until ctx is
// done or the listener is closed, then closes everything it opened. It
// returns nil after Close or ctx's end.
func (l *Listener) Serve(ctx context.Context, s Streamer) error {
	return l.ServeDial(ctx, StreamDialer(s))
}

// ServeDial is Serve with each guest side opened by dial: banger
// port-forward's CLI opens them through the daemon's API instead of an
// agent session of its own.
func (l *Listener) ServeDial(ctx context.Context, s DialFunc) error {
	l.served.Add(1)
	defer l.served.Done()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = l.closeSocket() })
	defer stop()
	var err error
	if l.tcp != nil {
		err = l.serveTCP(ctx, s)
	} else {
		err = l.serveUDP(ctx, s)
	}
	if ctx.Err() != nil || l.isClosed() {
		return nil
	}
	return err
}

// Close closes the host socket and every connection being forwarded, and
// waits for Serve to return.
func (l *Listener) Close() error {
	l.mu.Lock()
	l.closed = true
	conns := l.conns
	l.conns = map[net.Conn]struct{}{}
	l.mu.Unlock()
	err := l.closeSocket()
	for c := range conns {
		_ = c.Close()
	}
	l.served.Wait()
	return err
}

func (l *Listener) closeSocket() error {
	if l.tcp != nil {
		return l.tcp.Close()
	}
	return l.udp.Close()
}

func (l *Listener) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// track registers c for Close; it reports false (and closes c) when the
// listener is already closed.
func (l *Listener) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		_ = c.Close()
		return false
	}
	l.conns[c] = struct{}{}
	return true
}

func (l *Listener) untrack(c net.Conn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
}

func (l *Listener) serveTCP(ctx context.Context, s DialFunc) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.tcp.AcceptTCP()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept on %s: %w", l.tcp.Addr(), err)
		}
		if !l.track(c) {
			return nil
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer l.untrack(c)
			l.forwardTCP(ctx, s, c)
		}()
	}
}

// forwardTCP relays one accepted connection. A guest port that refuses, or
// a guest that cannot be reached, resets the host connection at once.
func (l *Listener) forwardTCP(ctx context.Context, s DialFunc, c *net.TCPConn) {
	st, err := s(ctx, TCP, l.spec.GuestPort)
	if err != nil {
		l.opts.Log.Debug("port-forward refused", "spec", l.spec.String(), "peer", c.RemoteAddr().String(), "err", err)
		reset(c)
		return
	}
	if !l.track(st) {
		reset(c)
		return
	}
	defer l.untrack(st)
	relay(ctx, c, st)
}

// udpSession is one host peer's stream to the guest port.
type udpSession struct {
	peer   netip.AddrPort
	queue  chan []byte
	last   atomic.Int64 // unix nanos of the last datagram either way
	cancel context.CancelFunc
}

func (u *udpSession) touch() { u.last.Store(time.Now().UnixNano()) }

func (l *Listener) serveUDP(ctx context.Context, s DialFunc) error {
	var (
		mu       sync.Mutex
		sessions = map[netip.AddrPort]*udpSession{}
		wg       sync.WaitGroup
	)
	defer func() {
		mu.Lock()
		for _, u := range sessions {
			u.cancel()
		}
		mu.Unlock()
		wg.Wait()
	}()
	// The janitor ends sessions idle for UDPIdleTimeout.
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(max(l.opts.UDPIdleTimeout/4, 10*time.Millisecond))
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			cutoff := time.Now().Add(-l.opts.UDPIdleTimeout).UnixNano()
			mu.Lock()
			for _, u := range sessions {
				if u.last.Load() < cutoff {
					u.cancel()
				}
			}
			mu.Unlock()
		}
	}()
	buf := make([]byte, MaxDatagram)
	for {
		n, peer, err := l.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("read on %s: %w", l.udp.LocalAddr(), err)
		}
		mu.Lock()
		u := sessions[peer]
		if u == nil {
			if len(sessions) >= l.opts.MaxUDPSessions {
				mu.Unlock()
				l.opts.Log.Debug("udp datagram dropped: too many peers", "spec", l.spec.String(), "peer", peer.String())
				continue
			}
			sctx, cancel := context.WithCancel(ctx)
			u = &udpSession{peer: peer, queue: make(chan []byte, udpQueue), cancel: cancel}
			u.touch()
			sessions[peer] = u
			wg.Add(1)
			go func() {
				defer wg.Done()
				l.runUDPSession(sctx, s, u)
				cancel()
				mu.Lock()
				if sessions[peer] == u {
					delete(sessions, peer)
				}
				mu.Unlock()
			}()
		}
		mu.Unlock()
		u.touch()
		select {
		case u.queue <- append([]byte(nil), buf[:n]...):
		default: // the peer outpaces its stream: drop, as UDP may
		}
	}
}

// runUDPSession opens the peer's stream and carries datagrams both ways
// until ctx ends (idle timeout, listener closed) or the stream fails.
func (l *Listener) runUDPSession(ctx context.Context, s DialFunc, u *udpSession) {
	st, err := s(ctx, UDP, l.spec.GuestPort)
	if err != nil {
		l.opts.Log.Debug("udp port-forward failed", "spec", l.spec.String(), "peer", u.peer.String(), "err", err)
		return
	}
	if !l.track(st) {
		return
	}
	defer l.untrack(st)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = st.Close() })
	defer func() {
		stop()
		_ = st.Close()
	}()
	go func() {
		defer cancel()
		buf := make([]byte, MaxDatagram)
		for {
			p, err := readDatagram(st, buf)
			if err != nil {
				return
			}
			u.touch()
			if _, err := l.udp.WriteToUDPAddrPort(p, u.peer); err != nil {
				return
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case p := <-u.queue:
			if err := writeDatagram(st, p); err != nil {
				return
			}
		}
	}
}

// Set is the published ports of one VM: all of them bound, or none.
type Set struct {
	listeners []*Listener
	cancel    context.CancelFunc
	done      chan struct{}
}

// Publish binds every spec and serves them through s until Close or ctx's
// end. When any bind fails, the ones already bound are closed and the error
// names the spec that failed.
func Publish(ctx context.Context, specs []Spec, s Streamer, opts Options) (*Set, error) {
	if err := CheckDistinct(specs); err != nil {
		return nil, err
	}
	set := &Set{done: make(chan struct{})}
	for _, spec := range specs {
		l, err := Listen(spec, opts)
		if err != nil {
			for _, b := range set.listeners {
				_ = b.Close()
			}
			return nil, err
		}
		set.listeners = append(set.listeners, l)
	}
	ctx, set.cancel = context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, l := range set.listeners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := l.Serve(ctx, s); err != nil && opts.Log != nil {
				opts.Log.Warn("published port stopped", "spec", l.Spec().String(), "err", err)
			}
		}()
	}
	go func() {
		wg.Wait()
		close(set.done)
	}()
	return set, nil
}

// Specs are the published specs with their bound host ports, in order.
func (s *Set) Specs() []Spec {
	out := make([]Spec, len(s.listeners))
	for i, l := range s.listeners {
		out[i] = l.Spec()
	}
	return out
}

// Close closes every listener and forwarded connection and waits for them.
func (s *Set) Close() error {
	s.cancel()
	var errs []error
	for _, l := range s.listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	<-s.done
	return errors.Join(errs...)
}
