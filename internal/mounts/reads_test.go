package mounts

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestReadStream reads files of a real folder through ServeReads and the
// guest's client over a socket pair: contents at any offset, a short read
// only at the end, and the errors an escape, a directory, a missing file
// and a closed handle give.
func TestReadStream(t *testing.T) {
	dir := t.TempDir()
	data := make([]byte, 3*readChunk+12345)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "f"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc/passwd", filepath.Join(dir, "out")); err != nil {
		t.Fatal(err)
	}
	root, err := OpenRoot(dir, true)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	host, guest, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ServeReads(host, root) }()
	c := newReadsClient(guest)

	fh, err := c.open("/f")
	if err != nil {
		t.Fatalf("open /f: %v", err)
	}
	for _, tc := range []struct {
		off, n  int
		want    int
		wantEOF bool
	}{
		{0, 4096, 4096, false},
		{7, 2*readChunk + 3, 2*readChunk + 3, false},
		{len(data) - 100, readChunk, 100, true},
		{len(data), 10, 0, true},
		{0, len(data) + 5, len(data), true},
	} {
		b := make([]byte, tc.n)
		n, err := c.readAt(fh, b, int64(tc.off))
		if n != tc.want || errors.Is(err, io.EOF) != tc.wantEOF || (err != nil && !errors.Is(err, io.EOF)) {
			t.Errorf("readAt(%d, %d) = %d, %v; want %d, EOF %v", tc.off, tc.n, n, err, tc.want, tc.wantEOF)
			continue
		}
		if !bytes.Equal(b[:n], data[tc.off:tc.off+n]) {
			t.Errorf("readAt(%d, %d): wrong bytes", tc.off, tc.n)
		}
	}
	for _, tc := range []struct {
		path string
		want syscall.Errno
	}{
		{"/../etc/passwd", syscall.ENOENT}, // cleaned to /etc/passwd beneath the folder
		{"/out", syscall.EACCES},
		{"/d", syscall.EISDIR},
		{"/missing", syscall.ENOENT},
	} {
		_, err := c.open(tc.path)
		if got := toErrno(err); got != tc.want {
			t.Errorf("open %s: %v (errno %d); want errno %d", tc.path, err, got, tc.want)
		}
	}
	if err := c.close(fh); err != nil {
		t.Fatalf("close: %v", err)
	}
	if _, err := c.readAt(fh, make([]byte, 10), 0); toErrno(err) != syscall.EBADF {
		t.Errorf("read after close: %v; want EBADF", err)
	}
	_ = guest.Close()
	if err := <-done; err != nil {
		t.Errorf("ServeReads: %v", err)
	}
	if _, err := c.open("/f"); toErrno(err) != syscall.EIO {
		t.Errorf("open on a closed stream: %v; want EIO", err)
	}
}
