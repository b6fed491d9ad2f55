package portfwd

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// pairStreamer stands in for the agent session: every stream is a real
// socket pair (or net.Pipe, which cannot half-close) whose far end the real
// guest side serves. "Guest" ports are therefore ports on this host.
type pairStreamer struct {
	guest  *Guest
	pipe   bool
	opened atomic.Int32
	wg     sync.WaitGroup
}

func (p *pairStreamer) OpenService(ctx context.Context, service string) (net.Conn, error) {
	if service != ServiceName {
		return nil, fmt.Errorf("no service %q", service)
	}
	p.opened.Add(1)
	var host, guest net.Conn
	if p.pipe {
		host, guest = net.Pipe()
	} else {
		var err error
		if host, guest, err = socketPair(); err != nil {
			return nil, err
		}
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		_ = p.guest.ServeStream(context.Background(), guest)
	}()
	return host, nil
}

func socketPair() (net.Conn, net.Conn, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	conn := func(fd int) (net.Conn, error) {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		return net.FileConn(f)
	}
	a, err := conn(fds[0])
	if err != nil {
		return nil, nil, err
	}
	b, err := conn(fds[1])
	if err != nil {
		_ = a.Close()
		return nil, nil, err
	}
	return a, b, nil
}

func newStreamer(t *testing.T, pipe bool) *pairStreamer {
	p := &pairStreamer{guest: &Guest{Addrs: func() []netip.Addr { return nil }}, pipe: pipe}
	t.Cleanup(p.wg.Wait)
	return p
}

func publish(t *testing.T, s Streamer, opts Options, values ...string) *Set {
	t.Helper()
	var specs []Spec
	for _, v := range values {
		sp, err := ParseSpecs(v)
		if err != nil {
			t.Fatal(err)
		}
		specs = append(specs, sp...)
	}
	set, err := Publish(context.Background(), specs, s, opts)
	if err != nil {
		t.Fatalf("Publish(%v): %v", values, err)
	}
	t.Cleanup(func() { _ = set.Close() })
	return set
}

// guestHTTP serves body on a free loopback port, the "guest service".
func guestHTTP(t *testing.T, body []byte) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write(body) })}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

func TestForwardTCPHTTP(t *testing.T) {
	body := make([]byte, 3<<20)
	_, _ = rand.Read(body)
	for _, pipe := range []bool{false, true} {
		t.Run(fmt.Sprintf("pipe=%v", pipe), func(t *testing.T) {
			port := guestHTTP(t, body)
			set := publish(t, newStreamer(t, pipe), Options{}, fmt.Sprintf("0:%d", port))
			got := set.Specs()[0]
			if got.HostPort == 0 || got.GuestPort != port || got.HostIP != DefaultHostIP {
				t.Fatalf("Specs() = %v: want a bound host port on 127.0.0.1 to guest port %d", got, port)
			}
			client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
			for i := 0; i < 3; i++ {
				resp, err := client.Get(fmt.Sprintf("http://%s/", got.HostAddr()))
				if err != nil {
					t.Fatalf("GET through %v: %v", got, err)
				}
				b, err := io.ReadAll(resp.Body)
				_ = resp.Body.Close()
				if err != nil || !bytes.Equal(b, body) {
					t.Fatalf("GET through %v: %d bytes, err %v; want the %d-byte body", got, len(b), err, len(body))
				}
			}
		})
	}
}

// A client that shuts down its write side still gets the answer: the
// half-close crosses the stream.
func TestForwardTCPHalfClose(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c) // until the client's FIN
				_, _ = c.Write(bytes.ToUpper(b))
			}()
		}
	}()
	set := publish(t, newStreamer(t, false), Options{}, fmt.Sprintf("0:%d", l.Addr().(*net.TCPAddr).Port))
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(set.Specs()[0].HostAddr()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = c.Write([]byte("hello, guest"))
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "HELLO, GUEST" {
		t.Fatalf("reply after half-close = %q, %v; want %q", got, err, "HELLO, GUEST")
	}
}

// Nothing listening on the guest port: the host connection is reset at
// once, it does not hang.
func TestForwardTCPRefusedResets(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close() // now nothing listens there
	set := publish(t, newStreamer(t, false), Options{}, fmt.Sprintf("0:%d", port))
	start := time.Now()
	c, err := net.Dial("tcp", set.Specs()[0].HostAddr().String())
	if err == nil {
		// The reset may come before or after the dial returns.
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read from a forward to a closed guest port: %v after %s; want ECONNRESET", err, time.Since(start))
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("reset took %s; want it at once", d)
	}
}

// A service bound only to the guest's own address (not loopback) is reached
// through the guest's address list.
func TestGuestDialsOwnAddress(t *testing.T) {
	own := netip.MustParseAddr("127.0.0.2") // stands in for the guest's eth0 address
	l, err := net.Listen("tcp", netip.AddrPortFrom(own, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			_, _ = c.Write([]byte("own"))
			_ = c.Close()
		}
	}()
	p := newStreamer(t, false)
	p.guest.Addrs = func() []netip.Addr { return []netip.Addr{own} }
	st, err := Dial(context.Background(), p, TCP, uint16(l.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatalf("Dial to a port bound to the guest address only: %v", err)
	}
	defer st.Close()
	if b, err := io.ReadAll(st); string(b) != "own" {
		t.Fatalf("read = %q, %v; want %q", b, err, "own")
	}
}

func TestListenPortInUse(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	freePort := free.Addr().(*net.TCPAddr).Port
	_ = free.Close()

	specs := []Spec{
		{HostIP: DefaultHostIP, HostPort: uint16(freePort), GuestPort: 80, Proto: TCP},
		{HostIP: DefaultHostIP, HostPort: uint16(busyPort), GuestPort: 81, Proto: TCP},
	}
	_, err = Publish(context.Background(), specs, newStreamer(t, false), Options{})
	if !errors.Is(err, ErrPortInUse) {
		t.Fatalf("Publish with a busy port: %v; want ErrPortInUse", err)
	}
	t.Logf("error: %v", err)
	// Nothing is half-made: the first, free port was released again.
	again, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", freePort))
	if err != nil {
		t.Fatalf("the free port of a failed Publish is still bound: %v", err)
	}
	_ = again.Close()
}

// Close ends the connections being forwarded, not only the listener.
func TestSetCloseEndsConnections(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	specs, _ := ParseSpecs(fmt.Sprintf("0:%d", l.Addr().(*net.TCPAddr).Port))
	set, err := Publish(context.Background(), specs, newStreamer(t, false), Options{})
	if err != nil {
		t.Fatal(err)
	}
	addr := set.Specs()[0].HostAddr().String()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	g := <-accepted
	defer g.Close()
	closed := make(chan error, 1)
	go func() { closed <- set.Close() }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Set.Close did not return with a connection open")
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("host connection after Set.Close: read err %v; want it closed", err)
	}
	if c2, err := net.Dial("tcp", addr); err == nil {
		_ = c2.Close()
		t.Fatalf("the listener %s still accepts after Close", addr)
	}
}

// guestUDPEcho answers every datagram with "echo:" + the datagram.
func guestUDPEcho(t *testing.T) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	go func() {
		buf := make([]byte, MaxDatagram)
		for {
			n, peer, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteToUDPAddrPort(append([]byte("echo:"), buf[:n]...), peer)
		}
	}()
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

func udpRoundTrip(t *testing.T, c *net.UDPConn, msg string) {
	t.Helper()
	buf := make([]byte, MaxDatagram)
	// UDP may drop the first datagram while the stream opens (it is queued,
	// but be tolerant as a real client is): retry a few times.
	for try := 0; try < 5; try++ {
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			continue
		}
		if got := string(buf[:n]); got != "echo:"+msg {
			t.Fatalf("UDP reply = %q, want %q", got, "echo:"+msg)
		}
		return
	}
	t.Fatalf("no UDP reply to %q", msg)
}

func TestForwardUDP(t *testing.T) {
	port := guestUDPEcho(t)
	p := newStreamer(t, false)
	set := publish(t, p, Options{UDPIdleTimeout: 300 * time.Millisecond}, fmt.Sprintf("0:%d/udp", port))
	addr := net.UDPAddrFromAddrPort(set.Specs()[0].HostAddr())
	a, err := net.DialUDP("udp", nil, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := net.DialUDP("udp", nil, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	// Two peers, interleaved: each gets its own replies (one session each).
	for i := 0; i < 3; i++ {
		udpRoundTrip(t, a, fmt.Sprintf("a%d", i))
		udpRoundTrip(t, b, fmt.Sprintf("b%d", i))
	}
	big := string(bytes.Repeat([]byte("x"), 60000))
	udpRoundTrip(t, a, big[:60000-5])
	if n := p.opened.Load(); n != 2 {
		t.Errorf("streams opened for two peers = %d, want 2", n)
	}
	// After the idle timeout the sessions end; a new datagram opens a new one.
	time.Sleep(time.Second)
	udpRoundTrip(t, a, "again")
	if n := p.opened.Load(); n != 3 {
		t.Errorf("streams opened after an idle timeout = %d, want 3", n)
	}
}

func TestForwardUDPMaxSessions(t *testing.T) {
	port := guestUDPEcho(t)
	p := newStreamer(t, false)
	set := publish(t, p, Options{MaxUDPSessions: 1}, fmt.Sprintf("0:%d/udp", port))
	addr := net.UDPAddrFromAddrPort(set.Specs()[0].HostAddr())
	a, _ := net.DialUDP("udp", nil, addr)
	defer a.Close()
	udpRoundTrip(t, a, "first")
	b, _ := net.DialUDP("udp", nil, addr)
	defer b.Close()
	_, _ = b.Write([]byte("second"))
	_ = b.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := b.Read(make([]byte, 100)); err == nil {
		t.Fatal("a second peer got an answer beyond MaxUDPSessions=1")
	}
	udpRoundTrip(t, a, "still")
}

// The guest refuses malformed requests with a reply, and never dials.
func TestGuestRefusesBadRequests(t *testing.T) {
	for _, tc := range []struct {
		name, line, code string
	}{
		{"version", `{"v":2,"proto":"tcp","port":80}`, CodeInvalid},
		{"proto", `{"v":1,"proto":"sctp","port":80}`, CodeInvalid},
		{"port0", `{"v":1,"proto":"tcp","port":0}`, CodeInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, guest, err := socketPair()
			if err != nil {
				t.Fatal(err)
			}
			defer host.Close()
			done := make(chan error, 1)
			go func() { done <- (&Guest{}).ServeStream(context.Background(), guest) }()
			_, _ = host.Write([]byte(tc.line + "\n"))
			var rep reply
			if err := readLine(host, &rep); err != nil || rep.OK || rep.Code != tc.code {
				t.Fatalf("reply to %s = %+v, %v; want code %q", tc.line, rep, err, tc.code)
			}
			if err := <-done; err == nil {
				t.Fatal("ServeStream returned nil for a refused request")
			}
		})
	}
	t.Run("long line", func(t *testing.T) {
		host, guest, err := socketPair()
		if err != nil {
			t.Fatal(err)
		}
		defer host.Close()
		done := make(chan error, 1)
		go func() { done <- (&Guest{}).ServeStream(context.Background(), guest) }()
		go func() { _, _ = host.Write(bytes.Repeat([]byte("a"), 4*MaxLineSize)) }()
		if err := <-done; !errors.Is(err, ErrProtocol) {
			t.Fatalf("ServeStream of an over-long line: %v; want ErrProtocol", err)
		}
	})
}
