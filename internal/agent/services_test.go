package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// A registered service gets the raw stream once the agent accepts it; an
// unknown one is refused with ErrUnknownOp; a built-in name is not a
// service.
func TestOpenService(t *testing.T) {
	s := newTestServer(t)
	s.Services = map[string]StreamService{
		"echo": func(ctx context.Context, c net.Conn) error {
			defer c.Close()
			_, err := io.Copy(c, c)
			return err
		},
	}
	host, guest := socketpair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.ServeConn(ctx, guest)
	}()
	c, err := NewClient(ctxTimeout(t, 5*time.Second), host, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Close()
		cancel()
		<-done
	})
	st, err := c.OpenService(ctxTimeout(t, 5*time.Second), "echo")
	if err != nil {
		t.Fatalf("OpenService(echo): %v", err)
	}
	if _, err := st.Write([]byte("ping over a service stream")); err != nil {
		t.Fatal(err)
	}
	if err := st.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(st)
	if err != nil || string(b) != "ping over a service stream" {
		t.Fatalf("echo service answered %q, %v", b, err)
	}
	_ = st.Close()
	if _, err := c.OpenService(ctxTimeout(t, 5*time.Second), "nope"); !errors.Is(err, ErrUnknownOp) {
		t.Errorf("OpenService(nope): %v; want ErrUnknownOp", err)
	}
	if _, err := c.OpenService(ctxTimeout(t, 5*time.Second), OpExec); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("OpenService(exec): %v; want ErrInvalidArgument", err)
	}
}
