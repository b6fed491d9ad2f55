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
