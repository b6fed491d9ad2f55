package blockdev_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

// debianImage returns a cached 1 GiB sparse ext4 image of the standard
// Debian test root filesystem (testutil.DebianRootfsTar), built once with
// tar --same-owner -xpf and mkfs.ext4 -d.
func debianImage(t testing.TB) string {
	t.Helper()
	testutil.RequiresRoot(t)
	testutil.RequiresTool(t, "tar", "mkfs.ext4", "e2fsck", "resize2fs")
	tarball := testutil.DebianRootfsTar(t, "", nil)
	out := filepath.Join(testutil.CacheDir(), "debian-bookworm-std.ext4")
	lock, err := os.OpenFile(out+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(out); err == nil {
		return out
	}
	root := t.TempDir()
	run(t, "tar", "--same-owner", "-xpf", tarball, "-C", root)
	tmp := out + ".tmp"
	sparse(t, tmp, 1<<30)
	run(t, "mkfs.ext4", "-F", "-q", "-d", root, tmp)
	if err := os.Rename(tmp, out); err != nil {
		t.Fatal(err)
	}
	return out
}

func sparse(t testing.TB, path string, size int64) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func sha(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// stageImage puts a sparse copy of the Debian image where banger keeps
// published images: <state>/images/debian/rootfs.ext4.
func stageImage(t testing.TB, state string) string {
	t.Helper()
	img := filepath.Join(state, "images", "debian", "rootfs.ext4")
	if err := os.MkdirAll(filepath.Dir(img), 0o700); err != nil {
		t.Fatal(err)
	}
	run(t, "cp", "--sparse=always", debianImage(t), img)
	return img
}

// checkDisk asserts the prepared disk is an ext4 filesystem of size bytes
// that e2fsck -fn finds clean, and sparse.
func checkDisk(t *testing.T, path string, size int64) {
	t.Helper()
	out, err := exec.Command("e2fsck", "-fn", path).CombinedOutput()
	if err != nil {
		t.Errorf("e2fsck -fn %s: %v\n%s", path, err, out)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != size {
		t.Errorf("%s is %d bytes, want %d", path, st.Size, size)
	}
	if st.Blocks*512 >= st.Size/2 {
		t.Errorf("%s allocates %d of %d bytes: holes were not preserved", path, st.Blocks*512, st.Size)
	}
	dump := run(t, "dumpe2fs", "-h", path)
	var blocks, bsize string
	for _, l := range strings.Split(dump, "\n") {
		k, v, _ := strings.Cut(l, ":")
		switch k {
		case "Block count":
			blocks = strings.TrimSpace(v)
		case "Block size":
			bsize = strings.TrimSpace(v)
		}
	}
	if want := size / 4096; bsize != "4096" || blocks != strconv.FormatInt(want, 10) {
		t.Errorf("filesystem in %s: %s blocks of %s bytes, want %d of 4096 (grown to fill the file)", path, blocks, bsize, want)
	}
}

func prepareAndCheck(t *testing.T, state, driver string) {
	ctx := context.Background()
	img := stageImage(t, state)
	before := sha(t, img)
	m := &blockdev.Manager{StateDir: state}
	vmDir := filepath.Join(state, "vms", "vm1")
	var intents []blockdev.Disk
	opts := blockdev.PrepareOptions{VMID: "vm1", BaseImage: img, VMDir: vmDir, SizeBytes: 2 << 30, Driver: driver,
		Intent: func(d blockdev.Disk) error {
			if _, err := os.Stat(d.Path); err == nil {
				t.Errorf("intent for %s recorded after it was created", d.Path)
			}
			intents = append(intents, d)
			return nil
		}}
	d, err := m.Prepare(ctx, opts)
	if err != nil {
		t.Fatalf("Prepare(%s): %v", driver, err)
	}
	if d.Driver != driver || d.Path != filepath.Join(vmDir, blockdev.DiskFileName) || len(intents) != 1 || intents[0].Path != d.Path {
		t.Errorf("Prepare = %+v with intents %+v", d, intents)
	}
	checkDisk(t, d.Path, 2<<30)
	if after := sha(t, img); after != before {
		t.Errorf("base image changed: sha256 %s before, %s after", before, after)
	}
	// Preparing again reuses the disk: no second copy, no second intent.
	st1, _ := os.Stat(d.Path)
	if d2, err := m.Prepare(ctx, opts); err != nil || !cmp.Equal(d2, d) {
		t.Errorf("second Prepare = %+v, %v; want %+v", d2, err, d)
	}
	if st2, _ := os.Stat(d.Path); !st2.ModTime().Equal(st1.ModTime()) || len(intents) != 1 {
		t.Errorf("second Prepare rewrote the disk")
	}
	for i := range 2 {
		if err := m.Teardown(ctx, d); err != nil {
			t.Fatalf("Teardown #%d: %v", i+1, err)
		}
	}
	if _, err := os.Stat(d.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("disk survived Teardown: %v", err)
	}
	if after := sha(t, img); after != before {
		t.Errorf("base image changed by Teardown")
	}
}

func TestPrepareCopyDebian(t *testing.T) {
	state := t.TempDir()
	prepareAndCheck(t, state, blockdev.DriverCopy)
}

func TestReflinkDetectionOnExt4(t *testing.T) {
	testutil.RequiresRoot(t)
	state := t.TempDir()
	var sfs unix.Statfs_t
	if err := unix.Statfs(state, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Type != unix.EXT4_SUPER_MAGIC {
		testutil.Missing(t, testutil.TierHost, fmt.Sprintf("the temp dir is not on ext4 (magic %#x); this test checks ext4's lack of reflinks", sfs.Type))
	}
	ok, err := blockdev.ReflinkSupported(state)
	if ok || err == nil || !errors.Is(err, unix.EOPNOTSUPP) {
		t.Errorf("ReflinkSupported(ext4) = %v, %v; want false with EOPNOTSUPP", ok, err)
	}
	driver, reason := (&blockdev.Manager{StateDir: state}).DetectDriver(context.Background())
	if driver != blockdev.DriverCopy || !strings.Contains(reason, "FICLONE") {
		t.Errorf("DetectDriver on ext4 without dm = %q (%s); want copy, naming FICLONE", driver, reason)
	}
	img := sparseFile(t, filepath.Join(state, "images", "x", "rootfs.ext4"), 1<<20)
	_, err = (&blockdev.Manager{StateDir: state}).Prepare(context.Background(), blockdev.PrepareOptions{
		VMID: "vm1", BaseImage: img, VMDir: filepath.Join(state, "vms", "vm1"), Driver: blockdev.DriverReflink})
	if !errors.Is(err, blockdev.ErrNotSupported) {
		t.Errorf("forced reflink on ext4 = %v, want ErrNotSupported", err)
	}
}

// xfsStateDir mounts a fresh XFS filesystem (reflink=1) on a loop device in
// a temp dir and returns it, or skips when mkfs.xfs is not installed.
func xfsStateDir(t testing.TB) string {
	t.Helper()
	testutil.RequiresLoop(t)
	testutil.RequiresTool(t, "mkfs.xfs") // a reflink-capable file system to test on (apt-get install xfsprogs)
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	sparse(t, img, 8<<30)
	run(t, "mkfs.xfs", "-q", "-m", "reflink=1", img)
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	dev, err := blockdev.AttachLoop(context.Background(), img, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = blockdev.DetachLoop(context.Background(), dev, img, dir) })
	if err := unix.Mount(dev, mnt, "xfs", 0, ""); err != nil {
		t.Fatalf("mount %s on %s: %v", dev, mnt, err)
	}
	t.Cleanup(func() {
		for i := 0; i < 50; i++ {
			if err := unix.Unmount(mnt, 0); err == nil || errors.Is(err, unix.EINVAL) {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("unmount %s failed", mnt)
	})
	return mnt
}

func TestPrepareReflinkDebian(t *testing.T) {
	state := xfsStateDir(t)
	driver, reason := (&blockdev.Manager{StateDir: state}).DetectDriver(context.Background())
	if driver != blockdev.DriverReflink {
		t.Fatalf("DetectDriver on XFS = %q (%s), want reflink", driver, reason)
	}
	prepareAndCheck(t, state, blockdev.DriverReflink)
}
