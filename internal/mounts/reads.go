package mounts

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
)

// The read stream is a mount's second stream, for the file reads of
// handles the guest opens read-only: SFTP's reads cost a TCG guest two
// copies of every byte at an odd address (pkg/sftp's reply packet puts the
// data 9 bytes in, and Go's memmove copies a misaligned run of more than
// 2 KiB one byte per step on a CPU without AVX, as QEMU's default one:
// ~190 MB/s against ~1.5 GB/s aligned), where this stream's replies land
// in the guest's read-ahead window in one copy of at most 2 KiB per step.
// The host serves it from the same Root, in the same server process, as
// the caller: every open is beneath the folder and read-only.
//
// Requests (guest → host), little-endian, 24 bytes:
//
//	id u32 | op u8 | 0 0 0 | fh u32 | n u32 | off u64
//
// opOpen opens the n-byte path that follows as file handle fh (chosen by
// the guest); opRead reads n bytes of fh at off; opClose closes fh.
// Replies (host → guest), 16 bytes, then n bytes of data for opRead:
//
//	id u32 | errno u32 | n u32 | 0 0 0 0
//
// A read returns fewer bytes than asked only at the end of the file.
// Replies may come in any order.
const (
	opOpen  = 1
	opRead  = 2
	opClose = 3

	readsReqLen   = 24
	readsReplyLen = 16
	// maxReadsRead bounds one read request; maxReadsFiles the handles a
	// guest may hold open on the stream.
	maxReadsRead  = 1 << 20
	maxReadsFiles = 4096
	// readsWorkers is how many reads the host serves at once.
	readsWorkers = 8
)

// ReadsVersion is the read stream's protocol version (the guest's
// handshake reply names it; a host that does not know it opens none).
const ReadsVersion = 1

var readsBufs = sync.Pool{New: func() any { b := make([]byte, readsReplyLen+maxReadsRead); return &b }}

// ServeReads answers read-stream requests on rwc from root until the peer
// closes it. It closes rwc and every file it opened.
func ServeReads(rwc io.ReadWriteCloser, root *Root) error {
	var (
		wmu   sync.Mutex
		fmu   sync.Mutex
		files = map[uint32]*os.File{}
		sem   = make(chan struct{}, readsWorkers)
		wg    sync.WaitGroup
	)
	defer func() {
		wg.Wait()
		for _, f := range files {
			_ = f.Close()
		}
	}()
	defer rwc.Close() // first: a reply blocked on a peer gone unblocks
	reply := func(b []byte, id uint32, errno syscall.Errno, n int) error {
		binary.LittleEndian.PutUint32(b[0:], id)
		binary.LittleEndian.PutUint32(b[4:], uint32(errno))
		binary.LittleEndian.PutUint32(b[8:], uint32(n))
		binary.LittleEndian.PutUint32(b[12:], 0)
		wmu.Lock()
		defer wmu.Unlock()
		_, err := rwc.Write(b[:readsReplyLen+n])
		return err
	}
	var hdr [readsReqLen]byte
	path := make([]byte, maxLine)
	for {
		if _, err := io.ReadFull(rwc, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		id := binary.LittleEndian.Uint32(hdr[0:])
		op := hdr[4]
		fh := binary.LittleEndian.Uint32(hdr[8:])
		n := binary.LittleEndian.Uint32(hdr[12:])
		off := binary.LittleEndian.Uint64(hdr[16:])
		var rb [readsReplyLen]byte
		switch op {
		case opOpen:
			if n == 0 || n > maxLine {
				return fmt.Errorf("read stream: open path of %d bytes", n)
			}
			if _, err := io.ReadFull(rwc, path[:n]); err != nil {
				return err
			}
			errno := syscall.Errno(0)
			fmu.Lock()
			_, taken := files[fh]
			full := len(files) >= maxReadsFiles
			fmu.Unlock()
			switch {
			case taken:
				errno = syscall.EBADF
			case full:
				errno = syscall.EMFILE
			default:
				f, err := root.OpenFile(string(path[:n]), os.O_RDONLY, 0)
				if err != nil {
					errno = syscall.EIO
					var e *Errno
					if errors.As(err, &e) {
						errno = e.Errno
					}
				} else {
					fmu.Lock()
					files[fh] = f
					fmu.Unlock()
				}
			}
			if err := reply(rb[:], id, errno, 0); err != nil {
				return err
			}
		case opClose:
			fmu.Lock()
			f := files[fh]
			delete(files, fh)
			fmu.Unlock()
			errno := syscall.EBADF
			if f != nil {
				errno = 0
				_ = f.Close() // a read of it still in flight holds the descriptor until it ends
			}
			if err := reply(rb[:], id, errno, 0); err != nil {
				return err
			}
		case opRead:
			if n > maxReadsRead || off > 1<<62 {
				return fmt.Errorf("read stream: read of %d bytes at %d", n, off)
			}
			fmu.Lock()
			f := files[fh]
			fmu.Unlock()
			if f == nil {
				if err := reply(rb[:], id, syscall.EBADF, 0); err != nil {
					return err
				}
				continue
			}
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				bp := readsBufs.Get().(*[]byte)
				defer readsBufs.Put(bp)
				b := *bp
				m, err := f.ReadAt(b[readsReplyLen:readsReplyLen+int(n)], int64(off))
				errno := syscall.Errno(0)
				if err != nil && !errors.Is(err, io.EOF) {
					m, errno = 0, root.failErrno("read", f.Name(), err)
				}
				if err := reply(b, id, errno, m); err != nil {
					_ = rwc.Close()
				}
			}()
		default:
			return fmt.Errorf("read stream: unknown op %d", op)
		}
	}
}

// failErrno is the errno fail gives the guest for err.
func (r *Root) failErrno(op, p string, err error) syscall.Errno {
	var e *Errno
	if errors.As(r.fail(op, p, err), &e) {
		return e.Errno
	}
	return syscall.EIO
}

// readsClient is the guest's end of a read stream.
type readsClient struct {
	conn io.ReadWriteCloser

	wmu sync.Mutex // request writes

	mu      sync.Mutex
	pending map[uint32]*readsCall
	nextID  uint32
	nextFH  uint32
	err     error // set once the stream has failed
	done    chan struct{}
}

type readsCall struct {
	buf   []byte
	n     int
	errno syscall.Errno
	done  chan struct{}
}

var errReadsLost = &Errno{Op: "read", Errno: syscall.EIO, Err: errors.New("the read stream to the host ended")}

func newReadsClient(conn io.ReadWriteCloser) *readsClient {
	c := &readsClient{conn: conn, pending: map[uint32]*readsCall{}, done: make(chan struct{})}
	go c.loop()
	return c
}

// smallReads reads at most 2 KiB at a time: Go copies a misaligned run of
// up to 2 KiB with SSE moves, a longer one byte by byte on a CPU without
// AVX, and the bytes' address in the stream's buffer is not ours to align.
type smallReads struct{ r io.Reader }

func (s smallReads) Read(p []byte) (int, error) {
	if len(p) > 2048 {
		p = p[:2048]
	}
	return s.r.Read(p)
}

func (c *readsClient) loop() {
	r := smallReads{c.conn}
	var hdr [readsReplyLen]byte
	err := func() error {
		for {
			if _, err := io.ReadFull(r, hdr[:]); err != nil {
				return err
			}
			id := binary.LittleEndian.Uint32(hdr[0:])
			errno := syscall.Errno(binary.LittleEndian.Uint32(hdr[4:]))
			n := int(binary.LittleEndian.Uint32(hdr[8:]))
			c.mu.Lock()
			call := c.pending[id]
			delete(c.pending, id)
			c.mu.Unlock()
			if call == nil || n > len(call.buf) {
				return fmt.Errorf("read stream: unexpected reply %d of %d bytes", id, n)
			}
			if _, err := io.ReadFull(r, call.buf[:n]); err != nil {
				return err
			}
			call.n, call.errno = n, errno
			close(call.done)
		}
	}()
	_ = c.conn.Close()
	c.mu.Lock()
	c.err = fmt.Errorf("%w: %w", errReadsLost, err)
	for id, call := range c.pending {
		call.errno = syscall.EIO
		close(call.done)
		delete(c.pending, id)
	}
	c.mu.Unlock()
	close(c.done)
}

// start sends one request; wait for call.done.
func (c *readsClient) start(op byte, fh uint32, n uint32, off int64, extra, buf []byte) (*readsCall, error) {
	call := &readsCall{buf: buf, done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return nil, c.err
	}
	id := c.nextID
	c.nextID++
	c.pending[id] = call
	c.mu.Unlock()
	req := make([]byte, readsReqLen, readsReqLen+len(extra))
	binary.LittleEndian.PutUint32(req[0:], id)
	req[4] = op
	binary.LittleEndian.PutUint32(req[8:], fh)
	binary.LittleEndian.PutUint32(req[12:], n)
	binary.LittleEndian.PutUint64(req[16:], uint64(off))
	req = append(req, extra...)
	c.wmu.Lock()
	_, err := c.conn.Write(req)
	c.wmu.Unlock()
	if err != nil {
		_ = c.conn.Close() // the loop fails the pending calls
	}
	return call, nil
}

func (c *readsClient) call(op byte, fh uint32, n uint32, off int64, extra, buf []byte) (int, error) {
	call, err := c.start(op, fh, n, off, extra, buf)
	if err != nil {
		return 0, err
	}
	<-call.done
	if call.errno != 0 {
		return 0, &Errno{Op: "read stream", Errno: call.errno, Err: call.errno}
	}
	return call.n, nil
}

// open opens p read-only on the host and returns its handle.
func (c *readsClient) open(p string) (uint32, error) {
	if len(p) == 0 || len(p) > maxLine {
		return 0, &Errno{Op: "open", Path: p, Errno: syscall.ENAMETOOLONG, Err: syscall.ENAMETOOLONG}
	}
	c.mu.Lock()
	fh := c.nextFH
	c.nextFH++
	c.mu.Unlock()
	_, err := c.call(opOpen, fh, uint32(len(p)), 0, []byte(p), nil)
	return fh, err
}

func (c *readsClient) close(fh uint32) error {
	_, err := c.call(opClose, fh, 0, 0, nil, nil)
	return err
}

// readChunk is what one read request asks for.
const readChunk = 512 << 10

// readAt reads len(b) bytes of fh at off, in requests of readChunk all in
// flight at once. It returns fewer bytes only at the end of the file (with
// io.EOF).
func (c *readsClient) readAt(fh uint32, b []byte, off int64) (int, error) {
	var calls []*readsCall
	var err error
	for i := 0; i < len(b); i += readChunk {
		chunk := b[i:min(i+readChunk, len(b))]
		call, serr := c.start(opRead, fh, uint32(len(chunk)), off+int64(i), nil, chunk)
		if serr != nil {
			err = serr
			break
		}
		calls = append(calls, call)
	}
	n, short := 0, false
	for i, call := range calls {
		<-call.done
		switch {
		case err != nil || short:
		case call.errno != 0:
			err = &Errno{Op: "read", Errno: call.errno, Err: call.errno}
		default:
			n += call.n
			short = call.n < len(b[i*readChunk:min((i+1)*readChunk, len(b))])
		}
	}
	if err != nil {
		return n, err
	}
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}
