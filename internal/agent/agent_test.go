package agent

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// newTestServer returns a server over a temp guest root with a fixed
// hostname and address list.
func newTestServer(t *testing.T) *Server {
	t.Helper()
	s := NewServer(t.TempDir(), "test-1.2.3")
	s.Hostname = func() (string, error) { return "guest-under-test", nil }
	s.Addresses = func() ([]InterfaceAddr, error) {
		return []InterfaceAddr{{Interface: "eth0", CIDR: "10.0.0.2/24"}}, nil
	}
	return s
}

// serveConn runs s.ServeConn on one end of a net.Pipe and returns the
// other end; the server goroutine's result arrives on the returned channel.
func servePipe(t *testing.T, s *Server, stream bool) (net.Conn, <-chan error) {
	t.Helper()
	host, guest := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		if stream {
			done <- s.ServeStream(ctx, guest)
		} else {
			done <- s.ServeConn(ctx, guest)
		}
	}()
	t.Cleanup(func() {
		cancel()
		_ = host.Close()
		_ = guest.Close()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			t.Errorf("server did not stop within 5s of cancel")
		}
	})
	return host, done
}

func testKey(t *testing.T, comment string) string {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sp))) + " " + comment
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// exercise runs every operation through c against s's temp root.
func exercise(t *testing.T, c *Client) {
	t.Helper()
	ctx := ctxTimeout(t, 5*time.Second)
	h, err := c.Health(ctx)
	if err != nil {
		t.Fatalf("Health: %v", err)
	}
	if h.AgentVersion != "test-1.2.3" || h.Hostname != "guest-under-test" || h.Uptime <= 0 {
		t.Errorf("Health = %+v, want version test-1.2.3, hostname guest-under-test, positive uptime", h)
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.FirstBoot != FirstBootDone || len(st.Addresses) != 1 || st.Addresses[0].CIDR != "10.0.0.2/24" {
		t.Errorf("Status = %+v, want first boot done and 10.0.0.2/24 on eth0", st)
	}
	key := testKey(t, "host@test")
	for i, want := range []bool{true, false} {
		added, err := c.AuthorizeKey(ctx, key)
		if err != nil || added != want {
			t.Errorf("AuthorizeKey #%d = %v, %v; want %v, nil", i+1, added, err, want)
		}
	}
}

func TestRoundTripPipe(t *testing.T) {
	s := newTestServer(t)
	host, _ := servePipe(t, s, false)
	c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{})
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	exercise(t, c)
}

func TestRoundTripPipeSerialMode(t *testing.T) {
	s := newTestServer(t)
	host, _ := servePipe(t, s, true)
	c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{Resync: true})
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	exercise(t, c)
}

// listenUnix serves s on a real Unix socket; stream selects ServeStream per
// connection (how a QEMU chardev looks from the host).
func listenUnix(t *testing.T, s *Server, stream bool) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		if !stream {
			done <- s.Serve(ctx, l)
			return
		}
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = s.ServeStream(ctx, &eofOnClose{c})
			}()
		}
	}()
	t.Cleanup(func() {
		cancel()
		_ = l.Close()
		<-done
	})
	return path
}

// eofOnClose ends ServeStream when the connection closes (a real port
// would report EOF forever; a test conn can be abandoned instead).
type eofOnClose struct{ net.Conn }

func (e *eofOnClose) Read(p []byte) (int, error) {
	n, err := e.Conn.Read(p)
	if errors.Is(err, io.EOF) {
		return n, net.ErrClosed
	}
	return n, err
}

func TestRoundTripUnixSocket(t *testing.T) {
	s := newTestServer(t)
	path := listenUnix(t, s, false)
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c, err := NewClient(ctxTimeout(t, 5*time.Second), conn, ClientOptions{})
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	exercise(t, c)
}

func TestDialVirtioSerialUnixSocket(t *testing.T) {
	s := newTestServer(t)
	path := listenUnix(t, s, true)
	c, err := Dial(ctxTimeout(t, 5*time.Second), TransportVirtioSerial, path)
	if err != nil {
		t.Fatalf("Dial(virtio-serial, %s): %v", path, err)
	}
	defer c.Close()
	exercise(t, c)
}

func TestDialUnknownTransport(t *testing.T) {
	_, err := Dial(context.Background(), "carrier-pigeon", "x")
	if !errors.Is(err, ErrUnknownTransport) {
		t.Errorf("Dial(carrier-pigeon) = %v, want ErrUnknownTransport", err)
	}
}

func frameHeader(n uint32, payload []byte) []byte {
	h := make([]byte, headerSize)
	copy(h, frameMagic[:])
	binary.BigEndian.PutUint32(h[4:8], n)
	binary.BigEndian.PutUint32(h[8:12], crc32.Checksum(payload, crcTable))
	return h
}

func mustFrame(t *testing.T, v any) []byte {
	t.Helper()
	f, err := encodeFrame(v)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestFrameSizeLimit(t *testing.T) {
	t.Run("encode refuses", func(t *testing.T) {
		_, err := encodeFrame(map[string]string{"x": strings.Repeat("a", MaxFrameSize)})
		if !errors.Is(err, ErrFrameTooLarge) {
			t.Errorf("encodeFrame(oversized) = %v, want ErrFrameTooLarge", err)
		}
	})
	t.Run("exactly max is accepted", func(t *testing.T) {
		payload := bytes.Repeat([]byte("a"), MaxFrameSize)
		in := append(frameHeader(MaxFrameSize, payload), payload...)
		got, err := newFrameReader(bytes.NewReader(in), false, 0).next(context.Background(), time.Time{})
		if err != nil || len(got) != MaxFrameSize {
			t.Errorf("next(max-size frame) = %d bytes, %v; want %d, nil", len(got), err, MaxFrameSize)
		}
	})
	t.Run("reader rejects on the header", func(t *testing.T) {
		// Only the header is sent: the reader must refuse without waiting
		// for (or allocating) the announced body.
		r := newFrameReader(bytes.NewReader(frameHeader(MaxFrameSize+1, nil)), false, 0)
		_, err := r.next(context.Background(), time.Time{})
		if !errors.Is(err, ErrFrameTooLarge) {
			t.Errorf("next(oversized header) = %v, want ErrFrameTooLarge", err)
		}
	})
	t.Run("server closes the connection", func(t *testing.T) {
		host, done := servePipe(t, newTestServer(t), false)
		go func() { _, _ = host.Write(frameHeader(1<<30, nil)) }()
		select {
		case err := <-done:
			if !errors.Is(err, ErrFrameTooLarge) {
				t.Errorf("ServeConn = %v, want ErrFrameTooLarge", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("server still serving 5s after an oversized frame")
		}
	})
	t.Run("client rejects an oversized reply", func(t *testing.T) {
		host, guest := net.Pipe()
		defer host.Close()
		defer guest.Close()
		go func() {
			buf := make([]byte, 4096)
			_, _ = guest.Read(buf)
			_, _ = guest.Write(frameHeader(MaxFrameSize+1, nil))
		}()
		_, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{})
		if !errors.Is(err, ErrFrameTooLarge) {
			t.Errorf("NewClient against an oversized reply = %v, want ErrFrameTooLarge", err)
		}
	})
	t.Run("status stays under the limit", func(t *testing.T) {
		s := newTestServer(t)
		long := strings.Repeat("x", 10000)
		var log strings.Builder
		for i := range 200 {
			fmt.Fprintf(&log, "%d %s\n", i, long)
		}
		writeGuestFile(t, s.Root, FirstBootLogFile, log.String())
		resp := s.Handle(context.Background(), Request{V: ProtocolVersion, ID: 1, Op: OpStatus})
		if _, err := encodeFrame(resp); err != nil {
			t.Fatalf("status reply does not fit a frame: %v", err)
		}
		lines := resp.Status.FirstBootLog
		if len(lines) != FirstBootLogLines || len(lines[0]) != maxLogLineBytes || !strings.HasPrefix(lines[19], "199 ") {
			t.Errorf("log tail: %d lines, first %d bytes, last starts %q; want 20 lines cut to %d bytes ending with line 199",
				len(lines), len(lines[0]), lines[19][:8], maxLogLineBytes)
		}
	})
}

func writeGuestFile(t *testing.T, root, rel, content string) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
