package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestFrameReaderResync(t *testing.T) {
	hello := mustFrame(t, Request{V: 1, ID: 7, Op: OpHello, Nonce: "n"})
	health := mustFrame(t, Request{V: 1, ID: 8, Op: OpHealth})
	badCRC := bytes.Clone(health)
	badCRC[len(badCRC)-2] ^= 0xff
	cases := []struct {
		name string
		in   []byte
		want int // frames recovered
	}{
		{"clean", concat(hello, health), 2},
		{"leading garbage", concat([]byte("\x00\xffnoise BNG BN"), hello), 1},
		{"magic inside garbage", concat([]byte("BNGAxxxxxxxxxxxx BNGA"), hello, health), 2},
		{"corrupted frame between good ones", concat(hello, badCRC, health), 2},
		{"oversized length", concat(frameHeader(MaxFrameSize+1, nil), hello), 1},
		{"truncated frame followed by a good one", concat(hello[:5], health), 1},
		{"truncated frame past its header followed by good ones", concat(hello[:headerSize+3], hello, health), 2},
		{"magic split at the end", concat(hello, []byte("BN")), 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fr := newFrameReader(bytes.NewReader(tc.in), true, 0)
			got := 0
			for {
				p, err := fr.next(context.Background(), time.Time{})
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatalf("next: %v", err)
				}
				var env envelope
				if err := json.Unmarshal(p, &env); err != nil || (env.ID != 7 && env.ID != 8) {
					t.Errorf("recovered payload %q is not one of the sent frames", p)
				}
				got++
			}
			if got != tc.want {
				t.Errorf("recovered %d frames from %q, want %d", got, tc.in, tc.want)
			}
		})
	}
	t.Run("strict mode fails on garbage", func(t *testing.T) {
		for _, in := range [][]byte{concat([]byte("x"), hello), badCRC} {
			_, err := newFrameReader(bytes.NewReader(in), false, 0).next(context.Background(), time.Time{})
			if !errors.Is(err, ErrBadFrame) {
				t.Errorf("strict next(%q) = %v, want ErrBadFrame", in, err)
			}
		}
	})
}

func concat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// readFrameFrom reads one frame from c in resync mode within d.
func readReply(t *testing.T, c net.Conn, d time.Duration) *Response {
	t.Helper()
	fr := newFrameReader(c, true, 0)
	p, err := fr.next(context.Background(), time.Now().Add(d))
	if err != nil {
		t.Fatalf("no reply within %s: %v", d, err)
	}
	var r Response
	if err := json.Unmarshal(p, &r); err != nil {
		t.Fatalf("reply %q: %v", p, err)
	}
	return &r
}

// A host that hangs up mid-frame leaves a header announcing bytes that
// never come. The agent must drop it and answer the next host's hello,
// which arrives on the same byte stream: at once, since the hello is a
// whole frame after it (FrameTimeout is for a half frame with nothing
// whole after it).
func TestServeStreamResyncsAfterTruncatedFrame(t *testing.T) {
	s := newTestServer(t)
	s.FrameTimeout = 2 * time.Second
	host, _ := servePipe(t, s, true)
	// A frame longer than what follows it, so no checksum can fail
	// before more bytes come.
	big := mustFrame(t, Request{V: 1, ID: 1, Op: OpAuthorizeKey, Key: strings.Repeat("k", 4000)})
	hello := mustFrame(t, Request{V: 1, ID: 2, Op: OpHello, Nonce: "second-host"})
	start := time.Now()
	go func() {
		_, _ = host.Write([]byte("line noise\x00\xff"))
		_, _ = host.Write(big[:headerSize+3]) // the first host died here
		_, _ = host.Write(hello)
	}()
	r := readReply(t, host, 5*time.Second)
	if r.ID != 2 || r.Hello == nil || r.Hello.Nonce != "second-host" {
		t.Fatalf("reply = %+v, want the hello echo for id 2", r)
	}
	if el := time.Since(start); el >= s.FrameTimeout {
		t.Errorf("answered after %s: the truncated frame was waited for (frame timeout %s) though a whole hello followed it", el, s.FrameTimeout)
	}
	// The stream is in sync again: a second request is answered at once.
	go func() { _, _ = host.Write(mustFrame(t, Request{V: 1, ID: 3, Op: OpHealth})) }()
	if r := readReply(t, host, time.Second); r.ID != 3 || r.Health == nil {
		t.Errorf("reply = %+v, want health for id 3", r)
	}
}

// scriptedPort is a fake virtio-serial port: reads return the queued
// chunks, io.EOF stands for "no host connected" (as virtio_console reports
// it), and writes are collected.
type scriptedPort struct {
	chunks chan []byte
	out    chan []byte
}

func (p *scriptedPort) Read(b []byte) (int, error) {
	c, ok := <-p.chunks
	if !ok {
		return 0, net.ErrClosed
	}
	if c == nil {
		return 0, io.EOF
	}
	return copy(b, c), nil
}

func (p *scriptedPort) Write(b []byte) (int, error) {
	p.out <- bytes.Clone(b)
	return len(b), nil
}

// An EOF from the port (the host disconnected) drops the half frame the
// old host left, even without deadlines on the port.
func TestServeStreamEOFDropsPartialFrame(t *testing.T) {
	s := newTestServer(t)
	s.FrameTimeout = time.Hour
	s.SerialEOFBackoff = time.Millisecond
	port := &scriptedPort{chunks: make(chan []byte, 8), out: make(chan []byte, 8)}
	health := mustFrame(t, Request{V: 1, ID: 1, Op: OpHealth})
	port.chunks <- health[:headerSize+5]
	port.chunks <- nil // host hung up
	port.chunks <- mustFrame(t, Request{V: 1, ID: 9, Op: OpHello, Nonce: "again"})
	close(port.chunks)
	errc := make(chan error, 1)
	go func() { errc <- s.ServeStream(context.Background(), port) }()
	select {
	case out := <-port.out:
		fr := newFrameReader(bytes.NewReader(out), false, 0)
		p, err := fr.next(context.Background(), time.Time{})
		if err != nil || !strings.Contains(string(p), `"nonce":"again"`) {
			t.Errorf("reply %q (%v), want the hello echo", p, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no reply after the host reconnected")
	}
	if err := <-errc; !errors.Is(err, net.ErrClosed) {
		t.Errorf("ServeStream = %v, want the port's close error", err)
	}
}

// The host side on a serial stream skips stale replies and garbage left
// over from an earlier connection until its own hello comes back.
func TestClientSkipsStaleSerialReplies(t *testing.T) {
	s := newTestServer(t)
	host, guest := socketPair(t)
	go func() {
		// Stale output of an earlier session, then the real agent.
		_, _ = guest.Write([]byte("\xffgarbage"))
		_, _ = guest.Write(mustFrame(t, Response{V: 1, ID: 1, Op: OpHello, Hello: &Hello{Nonce: "old"}}))
		_, _ = guest.Write(mustFrame(t, Response{V: 1, ID: 1, Op: OpHealth, Health: &Health{}}))
		_ = s.ServeStream(context.Background(), guest)
	}()
	c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{Resync: true})
	if err != nil {
		t.Fatalf("NewClient over a stream with stale replies: %v", err)
	}
	exercise(t, c)
	_ = guest.Close()
}

// A half reply left in the stream by an earlier session (what a guest
// restored from a snapshot may hold) announces more bytes than will ever
// follow; the client drops it as soon as a whole frame follows it, without
// waiting for FrameTimeout.
func TestClientDropsStaleHalfFrame(t *testing.T) {
	s := newTestServer(t)
	host, guest := socketPair(t)
	big := mustFrame(t, Response{V: 1, ID: 1, Op: OpHealth, Health: &Health{Hostname: strings.Repeat("h", 4000)}})
	go func() {
		_, _ = guest.Write(big[:200])
		_ = s.ServeStream(context.Background(), guest)
	}()
	start := time.Now()
	c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{Resync: true, HelloRetry: 100 * time.Millisecond, FrameTimeout: 2 * time.Second})
	if err != nil {
		t.Fatalf("NewClient after a stale half frame: %v", err)
	}
	if el := time.Since(start); el > time.Second {
		t.Errorf("hello answered after %s: the half frame was waited for (FrameTimeout 2s) though a whole reply followed it", el)
	}
	exercise(t, c)
}

// The serial hello is repeated until the agent answers: an agent that only
// starts reading later (or dropped the first hello) is still reached.
func TestClientRepeatsSerialHello(t *testing.T) {
	s := newTestServer(t)
	host, guest := net.Pipe()
	defer host.Close()
	defer guest.Close()
	go func() {
		// Swallow the first hello, as if the port was not open yet.
		fr := newFrameReader(guest, true, 0)
		if _, err := fr.next(context.Background(), time.Time{}); err != nil {
			return
		}
		_ = s.ServeStream(context.Background(), guest)
	}()
	c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{Resync: true, HelloRetry: 100 * time.Millisecond})
	if err != nil {
		t.Fatalf("NewClient with a lost first hello: %v", err)
	}
	if _, err := c.Health(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Errorf("Health: %v", err)
	}
}

// The first repeats of the serial hello come sooner than HelloRetry: an
// agent that dropped the first hello (a restored guest's, whose old
// session ate it) is reached in tens of milliseconds.
func TestClientRepeatsSerialHelloSoonFirst(t *testing.T) {
	s := newTestServer(t)
	host, guest := net.Pipe()
	defer host.Close()
	defer guest.Close()
	go func() {
		fr := newFrameReader(guest, true, 0)
		if _, err := fr.next(context.Background(), time.Time{}); err != nil {
			return
		}
		_ = s.ServeStream(context.Background(), guest)
	}()
	start := time.Now()
	if _, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{Resync: true, HelloRetry: time.Second}); err != nil {
		t.Fatalf("NewClient with a lost first hello: %v", err)
	}
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Errorf("hello answered after %s with a lost first hello; the first repeat should come after %s, not HelloRetry (1s)", el, firstHelloRetry)
	}
}

func TestVersionMismatch(t *testing.T) {
	t.Run("agent refuses a newer host", func(t *testing.T) {
		host, _ := servePipe(t, newTestServer(t), false)
		go func() {
			_, _ = host.Write(mustFrame(t, map[string]any{"v": 2, "id": 5, "op": "health", "new_field": []int{1}}))
		}()
		r := readReply(t, host, 5*time.Second)
		if r.ID != 5 || r.Error == nil || r.Error.Code != CodeVersionMismatch || !errors.Is(r.Error, ErrVersionMismatch) {
			t.Fatalf("reply = %+v, want a version_mismatch error for id 5", r)
		}
		if !strings.Contains(r.Error.Message, "v1") || !strings.Contains(r.Error.Message, "v2") {
			t.Errorf("message %q should name both versions", r.Error.Message)
		}
	})
	t.Run("host refuses a newer agent", func(t *testing.T) {
		for _, resync := range []bool{false, true} {
			host, guest := net.Pipe()
			go func() {
				fr := newFrameReader(guest, false, 0)
				p, err := fr.next(context.Background(), time.Time{})
				if err != nil {
					return
				}
				var env envelope
				_ = json.Unmarshal(p, &env)
				_, _ = guest.Write(mustFrame(t, map[string]any{"v": 2, "id": env.ID, "hello": map[string]any{"nonce": 42}}))
			}()
			_, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{Resync: resync})
			if !errors.Is(err, ErrVersionMismatch) || !strings.Contains(err.Error(), "v2") {
				t.Errorf("resync=%v: NewClient against a v2 agent = %v, want ErrVersionMismatch naming v2", resync, err)
			}
			_ = host.Close()
			_ = guest.Close()
		}
	})
	t.Run("WaitHealthy stops at once", func(t *testing.T) {
		calls := 0
		_, err := WaitHealthy(ctxTimeout(t, 5*time.Second), func(context.Context) (*Client, error) {
			calls++
			return nil, ErrVersionMismatch
		}, 10*time.Millisecond, nil)
		if !errors.Is(err, ErrVersionMismatch) || calls != 1 {
			t.Errorf("WaitHealthy = %v after %d dials, want ErrVersionMismatch after 1", err, calls)
		}
	})
}

func TestUnknownOp(t *testing.T) {
	host, _ := servePipe(t, newTestServer(t), false)
	c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.call(ctxTimeout(t, 5*time.Second), Request{Op: "format_disk"}, nil)
	if !errors.Is(err, ErrUnknownOp) {
		t.Errorf("call(format_disk) = %v, want ErrUnknownOp", err)
	}
}

// silentPeer reads and discards everything and never answers.
func silentPeer(t *testing.T) net.Conn {
	t.Helper()
	host, guest := net.Pipe()
	go func() { _, _ = io.Copy(io.Discard, guest) }()
	t.Cleanup(func() { _ = host.Close(); _ = guest.Close() })
	return host
}

func TestTimeouts(t *testing.T) {
	t.Run("hello to a silent agent", func(t *testing.T) {
		start := time.Now()
		_, err := NewClient(context.Background(), silentPeer(t), ClientOptions{RequestTimeout: 200 * time.Millisecond})
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("NewClient = %v, want os.ErrDeadlineExceeded", err)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Errorf("NewClient took %s with a 200ms request timeout", el)
		}
	})
	t.Run("serial hello to a silent agent honours ctx", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := NewClient(ctx, silentPeer(t), ClientOptions{Resync: true, HelloRetry: 50 * time.Millisecond})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("NewClient = %v, want context.DeadlineExceeded", err)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Errorf("NewClient took %s with a 300ms ctx", el)
		}
	})
	t.Run("request cancelled by ctx", func(t *testing.T) {
		s := newTestServer(t)
		host, guest := net.Pipe()
		defer host.Close()
		defer guest.Close()
		// Answer the hello, then go silent.
		go func() {
			fr := newFrameReader(guest, false, 0)
			p, err := fr.next(context.Background(), time.Time{})
			if err != nil {
				return
			}
			resp, _ := s.handlePayload(context.Background(), p)
			_, _ = guest.Write(mustFrame(t, resp))
			_, _ = io.Copy(io.Discard, guest)
		}()
		c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(200*time.Millisecond, cancel)
		if _, err := c.Status(ctx); !errors.Is(err, context.Canceled) {
			t.Errorf("Status after cancel = %v, want context.Canceled", err)
		}
	})
	t.Run("agent closes an idle connection", func(t *testing.T) {
		s := newTestServer(t)
		s.IdleTimeout = 200 * time.Millisecond
		host, done := servePipe(t, s, false)
		// Half a frame, then nothing.
		go func() { _, _ = host.Write(frameMagic[:]) }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("ServeConn on idle timeout = %v, want nil", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("idle connection still open after 5s with a 200ms idle timeout")
		}
	})
	t.Run("agent gives up on a host that never reads", func(t *testing.T) {
		s := newTestServer(t)
		s.WriteTimeout = 200 * time.Millisecond
		host, done := servePipe(t, s, false)
		go func() { _, _ = host.Write(mustFrame(t, Request{V: 1, ID: 1, Op: OpStatus})) }()
		select {
		case err := <-done:
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("ServeConn = %v, want a write deadline error", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("agent blocked for 5s writing to a host that never reads")
		}
	})
}

func TestWaitHealthy(t *testing.T) {
	s := newTestServer(t)
	path := listenUnix(t, s, false)
	attempts := 0
	var progress []int
	dial := func(ctx context.Context) (*Client, error) {
		attempts++
		if attempts < 3 {
			return nil, errors.New("guest still booting")
		}
		conn, err := (&net.Dialer{}).DialContext(ctx, "unix", path)
		if err != nil {
			return nil, err
		}
		return NewClient(ctx, conn, ClientOptions{})
	}
	h, err := WaitHealthy(ctxTimeout(t, 5*time.Second), dial, 10*time.Millisecond, func(n int, err error) {
		progress = append(progress, n)
	})
	if err != nil || h.Hostname != "guest-under-test" {
		t.Fatalf("WaitHealthy = %+v, %v", h, err)
	}
	if len(progress) != 2 || progress[0] != 1 || progress[1] != 2 {
		t.Errorf("progress calls %v, want [1 2]", progress)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = WaitHealthy(ctx, func(context.Context) (*Client, error) { return nil, errors.New("no agent") }, 10*time.Millisecond, nil)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no agent") {
		t.Errorf("WaitHealthy on a dead guest = %v, want DeadlineExceeded with the last error", err)
	}
}

// socketPair returns a connected pair of Unix stream sockets: unlike
// net.Pipe, writes are buffered as on a real port.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		_ = f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
		t.Cleanup(func() { _ = c.Close() })
	}
	return conns[0], conns[1]
}
