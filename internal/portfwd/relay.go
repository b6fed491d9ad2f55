package portfwd

import (
	"context"
	"errors"
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

// copyBuffered is io.Copy through two relayBufSize buffers, the reads in
// a goroutine of their own, so that the next read overlaps the write of
// the last one: a guest with two vCPUs copies out of the socket on one
// while the other writes to the agent channel (measured under TCG, 64 MiB
// from a guest's httpd: 78 against 71 MB/s, four runs each).
func copyBuffered(dst io.Writer, src io.Reader) (int64, error) {
	var bps [2]*[]byte
	free := make(chan []byte, len(bps))
	for i := range bps {
		bps[i] = relayBufs.Get().(*[]byte)
		free <- *bps[i]
	}
	full := make(chan []byte, len(bps))
	done := make(chan struct{})
	var readErr error // set before full is closed
	go func() {
		defer close(full)
		for {
			var b []byte
			select {
			case b = <-free:
			case <-done:
				return
			}
			n, err := src.Read(b)
			if n > 0 {
				select {
				case full <- b[:n]:
				case <-done:
					return
				}
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					readErr = err
				}
				return
			}
		}
	}()
	var written int64
	for b := range full {
		n, err := dst.Write(b)
		written += int64(n)
		if err == nil && n < len(b) {
			err = io.ErrShortWrite
		}
		if err != nil {
			// The reader may still be in a Read (the caller closes src
			// next): its buffers go to the garbage collector, not back to
			// the pool.
			close(done)
			return written, err
		}
		free <- b[:cap(b)]
	}
	for _, bp := range bps {
		relayBufs.Put(bp)
	}
	return written, readErr
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
