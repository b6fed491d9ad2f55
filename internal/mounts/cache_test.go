package mounts

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// serverRead is how many bytes the mount server process has read (rchar
// of /proc/PID/io): what the guest fetched from the host.
func serverRead(t *testing.T, p *Process) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(p.Pid()) + "/io")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "rchar: "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no rchar in /proc/%d/io", p.Pid())
	return 0
}

// A file read again unchanged comes from the guest's page cache (the host
// is not asked for its data again); a file changed on the host, even to
// the same size within the same second, is read afresh. Times come to the
// guest to the nanosecond, with the host's ctime and link count.
func TestGuestCacheAndTimes(t *testing.T) {
	w := newWorld(t)
	mnt, p := w.mountGuestProc(t, Spec{HostDir: w.share, GuestDir: "/src"})
	host := filepath.Join(w.share, "data.bin")
	data := make([]byte, 8<<20)
	_, _ = rand.Read(data)
	if err := os.WriteFile(host, data, 0o644); err != nil {
		t.Fatal(err)
	}
	read := func(what string, want []byte) {
		t.Helper()
		got, err := os.ReadFile(filepath.Join(mnt, "data.bin"))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: guest read %d bytes (%v), not the host's %d", what, len(got), err, len(want))
		}
	}
	read("first read", data)
	before := serverRead(t, p)
	read("second read", data)
	if n := serverRead(t, p) - before; n > 1<<20 {
		t.Errorf("reading an unchanged 8 MiB file again made the server read %d bytes; want it served from the guest's cache", n)
	}
	// Same size, same second: only the nanoseconds (and ctime) differ.
	changed := bytes.Clone(data)
	copy(changed, "changed on the host")
	if err := os.WriteFile(host, changed, 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the test mount's attribute cache
	read("read after a host change", changed)

	mtime := time.Date(2025, 5, 6, 7, 8, 9, 123456789, time.UTC)
	if err := os.Chtimes(host, mtime, mtime); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(host, filepath.Join(w.share, "data.link")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	fi, err := os.Stat(filepath.Join(mnt, "data.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if !fi.ModTime().Equal(mtime) {
		t.Errorf("guest mtime %s, want the host's %s to the nanosecond", fi.ModTime().UTC().Format(time.RFC3339Nano), mtime.Format(time.RFC3339Nano))
	}
	if n := nlink(fi); n != 2 {
		t.Errorf("guest link count %d, want 2", n)
	}
}

func nlink(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Nlink)
	}
	return 0
}

// Reads through the read-ahead windows give the host's bytes: sequential
// reads of odd sizes across window edges up to a ragged end, and reads at
// scattered offsets.
func TestGuestReadAhead(t *testing.T) {
	w := newWorld(t)
	mnt := w.mountGuest(t, Spec{HostDir: w.share, GuestDir: "/src"})
	data := make([]byte, 3*readAhead+12345)
	_, _ = rand.Read(data)
	if err := os.WriteFile(filepath.Join(w.share, "ra.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(mnt, "ra.bin"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var got bytes.Buffer
	buf := make([]byte, 100003)
	for {
		n, err := f.Read(buf)
		got.Write(buf[:n])
		if err != nil {
			break
		}
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("sequential read: %d bytes, differing from the host's %d", got.Len(), len(data))
	}
	for _, off := range []int64{5, readAhead - 7, 2*readAhead + 1, int64(len(data)) - 10, readAhead + 3} {
		b := make([]byte, 4096)
		n, err := f.ReadAt(b, off)
		want := data[off:min(off+4096, int64(len(data)))]
		if n != len(want) || !bytes.Equal(b[:n], want) {
			t.Errorf("pread at %d: %d bytes (%v), want the host's %d", off, n, err, len(want))
		}
	}
}
