package portfwd

import (
	"context"
	"io"
	"net"
	"sync"
)

// closeWriter is a connection that can end its write side and keep reading
// (TCP, Unix sockets, and the agent session's streams).
type closeWriter interface{ CloseWrite() error }

// relay copies bytes both ways between a and b until both directions end or
// ctx is done, then closes both. When one direction reaches EOF its
// destination's write side is closed (half-close), so a peer that shuts
// down writing still gets its answer; a destination that cannot half-close
// ends the whole relay instead.
func relay(ctx context.Context, a, b net.Conn) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			_ = a.Close()
			_ = b.Close()
		})
	}
	stop := context.AfterFunc(ctx, closeBoth)
	defer stop()
	var wg sync.WaitGroup
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		_, err := io.Copy(dst, src)
		cw, ok := dst.(closeWriter)
		if err != nil || !ok || cw.CloseWrite() != nil {
			closeBoth()
		}
	}
	wg.Add(2)
	go pipe(a, b)
	go pipe(b, a)
	wg.Wait()
	closeBoth()
}

// reset closes c so that its peer sees a connection reset (RST) rather than
// an orderly end, where c is a TCP connection.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}
