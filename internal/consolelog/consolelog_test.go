package consolelog

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func size(t *testing.T, p string) int64 {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return fi.Size()
}

func TestWriterRotates(t *testing.T) {
	log := filepath.Join(t.TempDir(), "console.log")
	w, err := Open(log, 10)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"aaaa", "bbbb", "cccc", "dd"} {
		if _, err := w.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	cur, _ := os.ReadFile(log)
	old, _ := os.ReadFile(log + ".1")
	if string(old) != "aaaabbbb" || string(cur) != "ccccdd" {
		t.Fatalf("after rotation: %s.1 = %q, %s = %q; want aaaabbbb and ccccdd", log, old, log, cur)
	}
	// A write over the cap keeps its newest bytes.
	w, _ = Open(log, 4)
	_, _ = w.Write([]byte("0123456789"))
	_ = w.Close()
	if cur, _ := os.ReadFile(log); string(cur) != "6789" {
		t.Fatalf("a 10-byte write under a 4-byte cap left %q, want 6789", cur)
	}
	if err := Remove(log); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(log + ".1"); err == nil {
		t.Fatal("Remove left the rotated log")
	}
}

func TestOpenRefusesSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "elsewhere")
	if err := os.Symlink(target, filepath.Join(dir, "console.log")); err != nil {
		t.Fatal(err)
	}
	if w, err := Open(filepath.Join(dir, "console.log"), 0); err == nil {
		_ = w.Close()
		t.Fatal("Open followed a symlink at the console log path")
	}
	if _, err := os.Lstat(target); err == nil {
		t.Fatal("Open created the symlink's target")
	}
}

// TestEndlessConsoleStaysCapped: a monitor whose guest writes to its
// console without end, through the console socket the daemon follows: the
// log and its rotated copy stay within the cap the whole time, and the
// newest output is what is kept.
func TestEndlessConsoleStaysCapped(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "console.sock")
	log := filepath.Join(dir, "console.log")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	stop := make(chan struct{})
	written := make(chan int64, 1)
	go func() { // the monitor: accept the daemon, then flood
		c, err := ln.Accept()
		if err != nil {
			written <- 0
			return
		}
		defer c.Close()
		line := []byte(strings.Repeat("x", 79) + "\n")
		chunk := bytes.Repeat(line, 800) // 64000 bytes
		var n int64
		for i := 0; ; i++ {
			select {
			case <-stop:
				_, _ = c.Write([]byte("LAST LINE\n"))
				written <- n
				return
			default:
			}
			m, err := c.Write(chunk)
			n += int64(m)
			if err != nil {
				written <- n
				return
			}
		}
	}()
	const capBytes = 256 << 10
	if err := FollowSocket(sock, log, capBytes); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Second)
	var peak int64
	for time.Now().Before(deadline) {
		if s := size(t, log) + size(t, log+".1"); s > peak {
			peak = s
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	n := <-written
	time.Sleep(200 * time.Millisecond) // the follower drains the last line
	total := size(t, log) + size(t, log+".1")
	t.Logf("guest wrote %d MiB; the logs peaked at %d KiB and hold %d KiB (cap %d KiB per file)", n>>20, peak>>10, total>>10, capBytes>>10)
	if n < 8*capBytes {
		t.Fatalf("the flood wrote only %d bytes; the test needs far more than the cap", n)
	}
	if peak > 2*capBytes || total > 2*capBytes {
		t.Fatalf("console logs reached %d bytes (now %d), over 2 x %d", peak, total, capBytes)
	}
	cur, _ := os.ReadFile(log)
	if !bytes.HasSuffix(cur, []byte("LAST LINE\n")) {
		t.Fatalf("the newest output is not kept: the log ends %q", cur[max(0, len(cur)-40):])
	}
}
