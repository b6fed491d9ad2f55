package portfwd

import (
	"context"
	"io"
	"net"
	"sync"
)

// relayBufSize is each direction's copy buffer: larger than io.Copy's
// 32 KiB because every read becomes one frame on the agent channel, and
// under TCG each frame and each system call costs guest CPU (a guest
// serving a download makes 8x fewer frames and reads with it).
const relayBufSize = 256 << 10

var relayBufs = sync.Pool{New: func() any { b := make([]byte, relayBufSize); return &b }}

// onlyReader and onlyWriter hide ReaderFrom and WriterTo, so that
// io.CopyBuffer uses relay's buffer (their generic versions copy 32 KiB at
// a time).
type onlyReader struct{ io.Reader }
type onlyWriter struct{ io.Writer }

// copyBuffered is io.Copy through a relayBufSize buffer.
func copyBuffered(dst io.Writer, src io.Reader) (int64, error) {
	bp := relayBufs.Get().(*[]byte)
	defer relayBufs.Put(bp)
	return io.CopyBuffer(onlyWriter{dst}, onlyReader{src}, *bp)
}

// Relay is relay for a caller outside the package: the daemon's side of
// banger port-forward, between the API connection and the agent stream.
func Relay(ctx context.Context, a, b net.Conn) { relay(ctx, a, b) }

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
		_, err := copyBuffered(dst, src)
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
