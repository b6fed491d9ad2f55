package mounts

import (
	"bytes"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"
)

// diskFolder is an ext4 file system on a loop device of its own, mounted
// at dir and owned by nobody, so a test can see what reached the device:
// sectorsWritten reads the device's write counter.
type diskFolder struct {
	dir  string
	loop string // loopN
}

func newDiskFolder(t *testing.T, w *world) *diskFolder {
	t.Helper()
	testutil.RequiresLoop(t)
	testutil.RequiresTool(t, "mkfs.ext4")
	img := filepath.Join(w.base, "disk.img")
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	run("truncate", "-s", "64M", img)
	run("mkfs.ext4", "-q", "-F", img)
	dev := run("losetup", "-f", "--show", img)
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	dir := filepath.Join(w.base, "disk")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// A long journal commit interval: only writeback or fsync puts file
	// data on the device within the test.
	run("mount", "-t", "ext4", "-o", "commit=300", dev, dir)
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			_ = syscall.Unmount(dir, syscall.MNT_DETACH)
		}
	})
	if err := os.Chown(dir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	return &diskFolder{dir: dir, loop: filepath.Base(dev)}
}

// sectorsWritten is the device's count of 512-byte sectors written
// (field 7 of /sys/block/<dev>/stat).
func (d *diskFolder) sectorsWritten(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", d.loop, "stat"))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	if len(f) < 7 {
		t.Fatalf("/sys/block/%s/stat: %q", d.loop, b)
	}
	n, err := strconv.ParseInt(f[6], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// A guest's fsync returns only once the data is on the host's disk: 4 MiB
// written through the mount stay in the host's page cache (the device's
// write counter barely moves) until the guest calls fsync, and when fsync
// returns the device has taken at least those 4 MiB. A file renamed after
// it was opened is synced too (the host syncs the descriptor the guest's
// handle wrote through, not whatever the old name now holds), and so is
// fdatasync.
func TestGuestFsyncReachesHostDisk(t *testing.T) {
	w := newWorld(t)
	d := newDiskFolder(t, w)
	mnt := w.mountGuest(t, Spec{HostDir: d.dir, GuestDir: "/src"})
	const size = 4 << 20
	const sectors = size / 512
	for _, tc := range []struct {
		name     string
		rename   bool
		dataOnly bool
	}{{"fsync", false, false}, {"fsync after rename", true, false}, {"fdatasync", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			data := make([]byte, size)
			_, _ = rand.Read(data)
			name := strings.ReplaceAll(tc.name, " ", "-")
			f, err := os.Create(filepath.Join(mnt, name+".tmp"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			before := d.sectorsWritten(t)
			if _, err := f.Write(data); err != nil {
				t.Fatal(err)
			}
			final := name + ".tmp"
			if tc.rename {
				final = name
				if err := os.Rename(filepath.Join(mnt, name+".tmp"), filepath.Join(mnt, final)); err != nil {
					t.Fatal(err)
				}
			}
			if got := d.sectorsWritten(t) - before; got >= sectors {
				t.Fatalf("the host device took %d sectors before any fsync (memory pressure?): this run cannot tell fsync from writeback", got)
			}
			if tc.dataOnly {
				err = syscall.Fdatasync(int(f.Fd()))
			} else {
				err = f.Sync()
			}
			if err != nil {
				t.Fatalf("%s in the guest: %v", tc.name, err)
			}
			if got := d.sectorsWritten(t) - before; got < sectors {
				t.Errorf("after the guest's %s returned the host device had taken %d sectors; want at least %d (the %d bytes written)", tc.name, got, sectors, size)
			}
			if b, err := os.ReadFile(filepath.Join(d.dir, final)); err != nil || !bytes.Equal(b, data) {
				t.Errorf("host reads %s: %d bytes, %v", final, len(b), err)
			}
		})
	}
}
