package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"time"
)

// frameMagic starts every frame; the serial reader resynchronises on it.
var frameMagic = [4]byte{'B', 'N', 'G', 'A'}

// headerSize is magic (4) + payload length (4) + crc32c of the payload (4).
const headerSize = 12

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// encodeFrame marshals v and returns the whole frame.
func encodeFrame(v any) ([]byte, error) {
	payload, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode agent message: %w", err)
	}
	if len(payload) > MaxFrameSize {
		return nil, fmt.Errorf("encode agent message of %d bytes (max %d): %w", len(payload), MaxFrameSize, ErrFrameTooLarge)
	}
	frame := make([]byte, headerSize+len(payload))
	copy(frame, frameMagic[:])
	binary.BigEndian.PutUint32(frame[4:8], uint32(len(payload))) //nolint:gosec // bounded by MaxFrameSize above
	binary.BigEndian.PutUint32(frame[8:12], crc32.Checksum(payload, crcTable))
	copy(frame[headerSize:], payload)
	return frame, nil
}

type readDeadliner interface {
	SetReadDeadline(t time.Time) error
}

type writeDeadliner interface {
	SetWriteDeadline(t time.Time) error
}

// frameReader cuts a byte stream into frame payloads.
//
// In strict mode (connection transports) anything that is not a valid frame
// is an error. In resync mode (virtio-serial) invalid bytes are skipped one
// at a time until a valid frame lines up, and a frame that has started but
// does not complete within frameTimeout is treated as garbage, so a frame
// cut short by a host disconnect cannot swallow the frames after it.
type frameReader struct {
	r            io.Reader
	deadline     readDeadliner // nil when r has no deadlines
	resync       bool
	frameTimeout time.Duration

	buf        []byte
	start, end int       // buf[start:end] is unconsumed
	pendingAt  time.Time // when the candidate frame at buf[start] began waiting for bytes
	pendingErr error     // a read error that came with data, returned once the data is used
	discarded  int64     // bytes skipped while resynchronising
}

func newFrameReader(r io.Reader, resync bool, frameTimeout time.Duration) *frameReader {
	fr := &frameReader{
		r:            r,
		resync:       resync,
		frameTimeout: frameTimeout,
		buf:          make([]byte, headerSize+MaxFrameSize+4096),
	}
	if d, ok := r.(readDeadliner); ok {
		fr.deadline = d
	}
	return fr
}

// reset drops every buffered byte (a serial host hung up: whatever it left
// half-sent is garbage).
func (fr *frameReader) reset() {
	fr.discarded += int64(fr.end - fr.start)
	fr.start, fr.end = 0, 0
	fr.pendingAt = time.Time{}
	fr.pendingErr = nil
}

// skip discards n unconsumed bytes.
func (fr *frameReader) skip(n int) {
	if n <= 0 {
		return
	}
	fr.start += n
	fr.discarded += int64(n)
	fr.pendingAt = time.Time{}
}

// parse returns the next complete frame's payload from the buffer, or nil
// when more bytes are needed.
func (fr *frameReader) parse() ([]byte, error) {
	for {
		b := fr.buf[fr.start:fr.end]
		if fr.resync {
			i := bytes.Index(b, frameMagic[:])
			if i < 0 {
				// Keep the longest tail that could still begin a magic.
				keep := 0
				for k := min(len(b), len(frameMagic)-1); k > 0; k-- {
					if bytes.HasPrefix(frameMagic[:], b[len(b)-k:]) {
						keep = k
						break
					}
				}
				fr.skip(len(b) - keep)
				return nil, nil
			}
			fr.skip(i)
			b = fr.buf[fr.start:fr.end]
		} else {
			n := min(len(b), len(frameMagic))
			if !bytes.Equal(b[:n], frameMagic[:n]) {
				return nil, fmt.Errorf("frame does not start with the agent magic: %w", ErrBadFrame)
			}
		}
		if len(b) < headerSize {
			return nil, nil
		}
		n := binary.BigEndian.Uint32(b[4:8])
		if n > MaxFrameSize {
			if fr.resync {
				fr.skip(1)
				continue
			}
			return nil, fmt.Errorf("frame announces %d bytes (max %d): %w", n, MaxFrameSize, ErrFrameTooLarge)
		}
		if len(b) < headerSize+int(n) {
			if fr.resync {
				if j := laterFrame(b); j > 0 {
					// A whole frame follows the incomplete one, which
					// therefore cannot be a frame: a payload is JSON,
					// which holds no raw byte below 0x20, and a header's
					// length starts with a zero byte. A half frame left
					// by an earlier session (a restored guest's) is
					// dropped at once, not after frameTimeout.
					fr.skip(j)
					continue
				}
			}
			return nil, nil
		}
		payload := b[headerSize : headerSize+int(n)]
		if crc32.Checksum(payload, crcTable) != binary.BigEndian.Uint32(b[8:12]) {
			if fr.resync {
				fr.skip(1)
				continue
			}
			return nil, fmt.Errorf("frame checksum mismatch: %w", ErrBadFrame)
		}
		out := bytes.Clone(payload)
		fr.start += headerSize + int(n)
		fr.pendingAt = time.Time{}
		return out, nil
	}
}

// laterFrame returns the offset of the first whole, valid frame in b after
// its first byte, or -1 when there is none.
func laterFrame(b []byte) int {
	for off := 1; off < len(b); {
		i := bytes.Index(b[off:], frameMagic[:])
		if i < 0 {
			return -1
		}
		j := off + i
		if c := b[j:]; len(c) >= headerSize {
			n := binary.BigEndian.Uint32(c[4:8])
			if n <= MaxFrameSize && len(c) >= headerSize+int(n) &&
				crc32.Checksum(c[headerSize:headerSize+int(n)], crcTable) == binary.BigEndian.Uint32(c[8:12]) {
				return j
			}
		}
		off = j + 1
	}
	return -1
}

// next returns the next frame payload. idle is the read deadline while no
// frame is in progress (zero: none). ctx cancellation is noticed between
// reads; the caller arranges for a blocked read to be woken (a past
// deadline or a close).
func (fr *frameReader) next(ctx context.Context, idle time.Time) ([]byte, error) {
	for {
		payload, err := fr.parse()
		if err != nil || payload != nil {
			return payload, err
		}
		if fr.pendingErr != nil {
			err := fr.pendingErr
			fr.pendingErr = nil
			return nil, err
		}
		deadline, frameDeadline := idle, false
		if fr.resync && fr.frameTimeout > 0 && fr.end > fr.start && fr.deadline != nil {
			if fr.pendingAt.IsZero() {
				fr.pendingAt = time.Now()
			}
			fd := fr.pendingAt.Add(fr.frameTimeout)
			if deadline.IsZero() || fd.Before(deadline) {
				deadline, frameDeadline = fd, true
			}
		}
		if fr.deadline != nil {
			if err := fr.deadline.SetReadDeadline(deadline); err != nil {
				if !errors.Is(err, os.ErrNoDeadline) {
					return nil, fmt.Errorf("set read deadline: %w", err)
				}
				fr.deadline = nil
			}
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if fr.start > 0 {
			copy(fr.buf, fr.buf[fr.start:fr.end])
			fr.end -= fr.start
			fr.start = 0
		}
		n, err := fr.r.Read(fr.buf[fr.end:])
		fr.end += n
		if err == nil {
			continue
		}
		if n > 0 {
			fr.pendingErr = err
			continue
		}
		if frameDeadline && errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil {
			// A frame started but never completed: its first byte is
			// garbage; look for the next magic in what we have.
			fr.skip(1)
			continue
		}
		return nil, err
	}
}

// framedConn sends and receives frames on one stream.
type framedConn struct {
	rw io.ReadWriter
	fr *frameReader
}

func newFramedConn(rw io.ReadWriter, resync bool, frameTimeout time.Duration) *framedConn {
	return &framedConn{rw: rw, fr: newFrameReader(rw, resync, frameTimeout)}
}

// send writes v as one frame in a single Write, with a write deadline when
// the stream supports one (zero: none).
func (fc *framedConn) send(v any, deadline time.Time) error {
	frame, err := encodeFrame(v)
	if err != nil {
		return err
	}
	if d, ok := fc.rw.(writeDeadliner); ok {
		if err := d.SetWriteDeadline(deadline); err != nil && !errors.Is(err, os.ErrNoDeadline) {
			return fmt.Errorf("set write deadline: %w", err)
		}
	}
	if _, err := fc.rw.Write(frame); err != nil {
		return fmt.Errorf("write agent frame: %w", err)
	}
	return nil
}
