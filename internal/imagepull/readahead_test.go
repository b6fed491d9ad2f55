package imagepull

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"testing"
	"testing/iotest"
	"time"
)

// TestReadAhead: the bytes come through unchanged, whatever the read
// sizes; the source's error comes after all its data; Close stops the
// goroutine (it no longer reads the source) and later reads fail.
func TestReadAhead(t *testing.T) {
	data := make([]byte, 3<<20+12345)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	ra := newReadAhead(iotest.HalfReader(bytes.NewReader(data)), 3, 64<<10)
	got, err := io.ReadAll(iotest.OneByteReader(io.LimitReader(ra, 1000)))
	if err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(ra)
	if err != nil || !bytes.Equal(append(got, rest...), data) {
		t.Fatalf("read-ahead changed the stream (err %v, %d bytes of %d)", err, len(got)+len(rest), len(data))
	}
	_ = ra.Close()
	if err := iotest.TestReader(newReadAhead(bytes.NewReader(data), 2, 4096), data); err != nil {
		t.Error(err)
	}

	boom := errors.New("boom")
	ra = newReadAhead(io.MultiReader(bytes.NewReader(data[:100000]), iotest.ErrReader(boom)), 2, 4096)
	got, err = io.ReadAll(ra)
	if !errors.Is(err, boom) || !bytes.Equal(got, data[:100000]) {
		t.Errorf("source error: read %d bytes, err %v; want 100000 bytes then boom", len(got), err)
	}

	src := &countingReader{r: bytes.NewReader(data)}
	ra = newReadAhead(src, 2, 4096)
	if _, err := ra.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	_ = ra.Close()
	n := src.n
	time.Sleep(50 * time.Millisecond)
	if src.n != n || n > 4*4096 {
		t.Errorf("the source was read %d bytes (then %d) after one 10-byte read and Close; want at most 3 buffers and nothing after Close", n, src.n)
	}
	if _, err := ra.Read(make([]byte, 10)); err == nil {
		t.Error("Read after Close succeeded")
	}
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}
