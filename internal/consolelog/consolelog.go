// Package consolelog keeps a VM's serial console on disk within a size cap,
// whatever the guest writes.
//
// The VM monitor does not write the log itself: its serial port is a Unix
// socket (the monitor listens on a descriptor the daemon made), and the
// daemon follows it (Follow) into a Writer. The Writer keeps the newest
// output in <log> and the previous Max bytes in <log>.1: when a write would
// take <log> past Max, <log> is copied to <log>.1 and truncated. Other
// writers that append to <log> (the monitor's own stderr, opened O_APPEND)
// keep working across a rotation, because the file is truncated in place,
// never renamed. The two files together never hold more than 2×Max bytes
// plus one monitor message.
//
// While the daemon is down nobody follows the socket and the monitor drops
// the console output (a socket chardev without a client discards it); the
// next daemon follows again when it re-adopts the VM.
package consolelog

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultMax is the cap on one console log file when the config sets none.
const DefaultMax = 4 << 20

// Writer appends to a capped, rotated log file. It is safe for concurrent
// use.
type Writer struct {
	path string
	max  int64
	mu   sync.Mutex
	f    *os.File
}

// Open opens (creating, mode 0640) the log at path for appending, capped at
// max bytes per file (DefaultMax when max <= 0). The log is opened without
// following a symlink.
func Open(path string, max int64) (*Writer, error) {
	if max <= 0 {
		max = DefaultMax
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open console log: %w", err)
	}
	return &Writer{path: path, max: max, f: f}, nil
}

// Write implements io.Writer. A write larger than the cap keeps only its
// last max bytes.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(p)
	if int64(len(p)) > w.max {
		p = p[int64(len(p))-w.max:]
	}
	fi, err := w.f.Stat()
	if err != nil {
		return 0, err
	}
	if fi.Size()+int64(len(p)) > w.max {
		if err := w.rotate(); err != nil {
			return 0, err
		}
	}
	if _, err := w.f.Write(p); err != nil {
		return 0, err
	}
	return n, nil
}

// rotate copies the log to <log>.1 (replacing it) and truncates the log.
func (w *Writer) rotate() error {
	old := w.path + ".1"
	tmp, err := os.OpenFile(old+".tmp", os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o640)
	if err != nil {
		return fmt.Errorf("rotate console log: %w", err)
	}
	src, err := os.OpenFile(w.path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err == nil {
		_, err = io.Copy(tmp, io.LimitReader(src, w.max+64<<10))
		_ = src.Close()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(old+".tmp", old)
	}
	if err == nil {
		err = w.f.Truncate(0)
	}
	if err != nil {
		_ = os.Remove(old + ".tmp")
		return fmt.Errorf("rotate console log: %w", err)
	}
	return nil
}

// Close closes the log file.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.f.Close()
}

// Remove removes the log and its rotated copy; missing files are fine.
func Remove(path string) error {
	var errs []error
	for _, p := range []string{path, path + ".1", path + ".1.tmp"} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Follow copies everything read from conn into w until conn reaches its end
// (the monitor exited) or ctx ends, then closes conn and w.
func Follow(ctx context.Context, conn net.Conn, w *Writer) error {
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	defer stop()
	_, err := io.Copy(w, conn)
	_ = conn.Close()
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

var (
	followMu  sync.Mutex
	following = map[string]bool{}
)

// FollowSocket follows the console socket at sock into the log at path, in
// the background, unless it is already being followed by this process. It
// dials the socket first and returns the dial error; the copy then runs
// until the monitor closes the socket.
func FollowSocket(sock, path string, max int64) error {
	followMu.Lock()
	defer followMu.Unlock()
	if following[sock] {
		return nil
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		return fmt.Errorf("follow console %s: %w", sock, err)
	}
	return followConn(sock, conn, path, max)
}

// FollowConn is FollowSocket for a connection already made (the daemon
// connects to the listening socket before the monitor starts, so no early
// output is lost).
func FollowConn(sock string, conn net.Conn, path string, max int64) error {
	followMu.Lock()
	defer followMu.Unlock()
	return followConn(sock, conn, path, max)
}

func followConn(sock string, conn net.Conn, path string, max int64) error {
	w, err := Open(path, max)
	if err != nil {
		_ = conn.Close()
		return err
	}
	following[sock] = true
	go func() {
		_ = Follow(context.Background(), conn, w)
		followMu.Lock()
		delete(following, sock)
		followMu.Unlock()
	}()
	return nil
}
