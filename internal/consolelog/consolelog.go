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
	following = map[string]chan struct{}{} // closed when the follower ends
)

// FollowSocket follows the console socket at sock into the log at path, in
// the background, unless it is already being followed by this process. It
// dials the socket first and returns the dial error; the copy then runs
// until the monitor closes the socket.
func FollowSocket(sock, path string, max int64) error {
	followMu.Lock()
	defer followMu.Unlock()
	if following[sock] != nil {
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
	done := make(chan struct{})
	following[sock] = done
	go func() {
		_ = Follow(context.Background(), conn, w)
		followMu.Lock()
		delete(following, sock)
		followMu.Unlock()
		close(done)
	}()
	return nil
}

// A FIFO console, for monitors whose serial console is their standard
// output (Firecracker): the daemon makes a named pipe in the VM's runtime
// dir, gives the monitor its write end as stdout and stderr, and follows
// the read end into the capped log. The pipe outlives a daemon restart
// because the monitor holds its write end: while no daemon reads it, the
// monitor's writes fail with EPIPE and the output is dropped (Firecracker,
// like every Rust program, ignores SIGPIPE), and the next daemon opens the
// read end again when it re-adopts the VM (FollowFIFO).

// MakeFIFO creates the named pipe at path (mode 0600), replacing a stale
// named pipe left by a crashed run. Anything else at path is refused.
func MakeFIFO(path string) error {
	if err := RemoveFIFO(path); err != nil {
		return err
	}
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return fmt.Errorf("make console pipe %s: %w", path, err)
	}
	return nil
}

// RemoveFIFO removes the named pipe at path; a missing file is fine, and
// anything but a named pipe is refused.
func RemoveFIFO(path string) error {
	if path == "" {
		return nil
	}
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove console pipe: %w", err)
	}
	if fi.Mode().Type() != os.ModeNamedPipe {
		return fmt.Errorf("remove console pipe %s: not a named pipe (%v)", path, fi.Mode().Type())
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove console pipe: %w", err)
	}
	return nil
}

// OpenFIFO opens the console pipe at path for the monitor's use: it starts
// following the read end into the log at logPath (capped at max) first,
// so not a byte is lost, and returns the write end, which the caller gives
// the monitor as stdout and stderr and then closes. The follower ends when
// the last write end is closed (the monitor exited).
func OpenFIFO(path, logPath string, max int64) (*os.File, error) {
	followMu.Lock()
	defer followMu.Unlock()
	r, err := openFIFORead(path)
	if err != nil {
		return nil, err
	}
	w, err := os.OpenFile(path, os.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		_ = r.Close()
		return nil, fmt.Errorf("open console pipe: %w", err)
	}
	if err := followFile(path, r, logPath, max); err != nil {
		_ = w.Close()
		return nil, err
	}
	return w, nil
}

// FollowFIFO follows the console pipe at path into the log again, for a
// daemon that re-adopts a running VM, unless this process follows it
// already. It never blocks: the read end is opened non-blocking.
func FollowFIFO(path, logPath string, max int64) error {
	followMu.Lock()
	defer followMu.Unlock()
	if following[path] != nil {
		return nil
	}
	r, err := openFIFORead(path)
	if err != nil {
		return err
	}
	return followFile(path, r, logPath, max)
}

// openFIFORead opens the read end of the named pipe at path without
// blocking (no writer is needed), without following a symlink, and checks
// that it is a named pipe.
func openFIFORead(path string) (*os.File, error) {
	r, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open console pipe: %w", err)
	}
	if fi, err := r.Stat(); err != nil || fi.Mode().Type() != os.ModeNamedPipe {
		_ = r.Close()
		return nil, fmt.Errorf("open console pipe %s: not a named pipe", path)
	}
	return r, nil
}

func followFile(key string, r *os.File, logPath string, max int64) error {
	w, err := Open(logPath, max)
	if err != nil {
		_ = r.Close()
		return err
	}
	done := make(chan struct{})
	following[key] = done
	readers[key] = r
	go func() {
		_, _ = io.Copy(w, r)
		_ = r.Close()
		_ = w.Close()
		followMu.Lock()
		delete(following, key)
		delete(readers, key)
		followMu.Unlock()
		close(done)
	}()
	return nil
}

// readers are the read ends of the console pipes being followed.
var readers = map[string]*os.File{}

// Unfollow stops following the console pipe at key and closes its read
// end, as the daemon's exit does (the monitor's writes then fail with
// EPIPE and are dropped until FollowFIFO runs again). It returns once the
// follower has ended.
func Unfollow(key string) {
	followMu.Lock()
	r, done := readers[key], following[key]
	followMu.Unlock()
	if r == nil {
		return
	}
	_ = r.Close()
	<-done
}

// Drain waits up to timeout for this process's follower of key (a console
// socket or pipe path) to end, which it does once the monitor has exited
// and everything it wrote is in the log. It reports whether no follower
// is left.
func Drain(key string, timeout time.Duration) bool {
	followMu.Lock()
	done := following[key]
	followMu.Unlock()
	if done == nil {
		return true
	}
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}
