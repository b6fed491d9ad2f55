package imagepull

import (
	"errors"
	"io"
	"sync"
)

// readAhead reads r in its own goroutine into a few fixed buffers, so that
// the stage producing r (reading and hashing the blob, or decompressing
// it) runs on another core than the stage consuming it (decompression,
// tar parsing, the ext4 writer). Memory is bounded: n buffers of size
// bytes. Close stops the goroutine and waits for it, so that r can be
// closed safely afterwards; it does not close r.
type readAhead struct {
	full chan raChunk
	free chan []byte
	stop chan struct{}
	wg   sync.WaitGroup

	cur  []byte // unread part of the chunk being consumed
	buf  []byte // the whole buffer of that chunk, to return to free
	err  error  // the producer's final error, once reached
	once sync.Once
}

type raChunk struct {
	b   []byte
	err error
}

// errReadAheadClosed is what a Read after Close returns.
var errReadAheadClosed = errors.New("read-ahead reader closed")

func newReadAhead(r io.Reader, n, size int) *readAhead {
	ra := &readAhead{full: make(chan raChunk, n), free: make(chan []byte, n), stop: make(chan struct{})}
	for range n {
		ra.free <- make([]byte, size)
	}
	ra.wg.Add(1)
	go ra.fill(r)
	return ra
}

func (ra *readAhead) fill(r io.Reader) {
	defer ra.wg.Done()
	for {
		var b []byte
		select {
		case b = <-ra.free:
		case <-ra.stop:
			return
		}
		k, err := io.ReadFull(r, b)
		if errors.Is(err, io.ErrUnexpectedEOF) {
			err = io.EOF
		}
		select {
		case ra.full <- raChunk{b: b[:k], err: err}:
		case <-ra.stop:
			return
		}
		if err != nil {
			return
		}
	}
}

func (ra *readAhead) Read(p []byte) (int, error) {
	select {
	case <-ra.stop:
		return 0, errReadAheadClosed
	default:
	}
	for len(ra.cur) == 0 {
		if ra.err != nil {
			return 0, ra.err
		}
		if ra.buf != nil {
			ra.free <- ra.buf[:cap(ra.buf)]
			ra.buf = nil
		}
		select {
		case c := <-ra.full:
			ra.cur, ra.buf, ra.err = c.b, c.b, c.err
		case <-ra.stop:
			return 0, errReadAheadClosed
		}
	}
	n := copy(p, ra.cur)
	ra.cur = ra.cur[n:]
	return n, nil
}

// Close stops the reading goroutine and waits until it no longer touches
// the underlying reader.
func (ra *readAhead) Close() error {
	ra.once.Do(func() {
		close(ra.stop)
		ra.wg.Wait()
	})
	return nil
}
