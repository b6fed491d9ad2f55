package imagepull

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"
)

func TestDefaultSize(t *testing.T) {
	const MiB, GiB = 1 << 20, 1 << 30
	for _, tc := range []struct{ content, want int64 }{
		{0, GiB},
		{-5, GiB},
		{600 * MiB, GiB},        // 900 MiB -> floor
		{700 * MiB, 1052 * MiB}, // 1050 MiB -> 4 MiB multiple
		{245 * MiB, GiB},
		{10 * GiB, 15 * GiB},
		{1<<30 + 1, 1536*MiB + 4*MiB},
	} {
		got := DefaultSize(tc.content)
		if got != tc.want {
			t.Errorf("DefaultSize(%d) = %d, want %d", tc.content, got, tc.want)
		}
		if got%(4*MiB) != 0 {
			t.Errorf("DefaultSize(%d) = %d is not a 4 MiB multiple", tc.content, got)
		}
		// The default always passes CheckSize.
		if err := CheckSize(max(tc.content, 0), got); err != nil {
			t.Errorf("CheckSize(%d, DefaultSize) = %v", tc.content, err)
		}
	}
}

func TestCheckSize(t *testing.T) {
	const MiB, GiB = 1 << 20, 1 << 30
	for _, tc := range []struct {
		content, size int64
		ok            bool
	}{
		{245 * MiB, GiB, true},
		{2 * GiB, GiB, false},
		{GiB, GiB, false},
		{850 * MiB, GiB, false},
		{0, 0, false},
		{0, 256 * MiB, true},
	} {
		err := CheckSize(tc.content, tc.size)
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrSizeTooSmall)) {
			t.Errorf("CheckSize(%d, %d) = %v, want ok=%v", tc.content, tc.size, err, tc.ok)
		}
	}
}

func TestParseE2fsVersion(t *testing.T) {
	for out, want := range map[string]string{
		"mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library version 1.47.0\n": "1.47.0",
		"mke2fs 1.43 (17-May-2016)\n":                                         "1.43",
		"mke2fs 1.46.5 (30-Dec-2021)":                                         "1.46.5",
	} {
		got, err := parseE2fsVersion(out)
		if err != nil || got != want {
			t.Errorf("parseE2fsVersion(%q) = %q, %v; want %q", out, got, err, want)
		}
	}
	for _, out := range []string{"mke2fs 1.42.9 (28-Dec-2013)", "mke2fs 0.9", "busybox"} {
		if _, err := parseE2fsVersion(out); !errors.Is(err, ErrE2fsprogs) {
			t.Errorf("parseE2fsVersion(%q) = %v, want ErrE2fsprogs", out, err)
		}
	}
	if !strings.Contains(ErrE2fsprogs.Error(), "apt-get install e2fsprogs") {
		t.Errorf("ErrE2fsprogs %q does not say how to fix it", ErrE2fsprogs)
	}
}

func TestCheckE2fsprogs(t *testing.T) {
	requireE2fsprogs(t)
	v, err := CheckE2fsprogs(context.Background())
	if err != nil || !regexp.MustCompile(`^1\.[0-9]+`).MatchString(v) {
		t.Fatalf("CheckE2fsprogs = %q, %v", v, err)
	}
	t.Setenv("PATH", t.TempDir())
	if _, err := CheckE2fsprogs(context.Background()); !errors.Is(err, ErrE2fsprogs) {
		t.Fatalf("CheckE2fsprogs without mkfs.ext4 in PATH = %v, want ErrE2fsprogs", err)
	}
}

// dumpe2fs returns a field of the superblock, e.g. "Inode count".
func dumpe2fs(t *testing.T, img, field string) string {
	t.Helper()
	out, err := exec.Command("dumpe2fs", "-h", img).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs -h %s: %v\n%s", img, err, out)
	}
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(field) + `:\s+(.*)$`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("dumpe2fs: no %q in\n%s", field, out)
	}
	return strings.TrimSpace(m[1])
}

func TestBuildExt4(t *testing.T) {
	requireE2fsprogs(t)
	staging := stageFiles(t, map[string]string{"etc/hostname": "banger\n", "usr/bin/tool": strings.Repeat("x", 100000)}, "var/empty")
	if err := os.Link(filepath.Join(staging, "usr/bin/tool"), filepath.Join(staging, "usr/bin/tool-hardlink")); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	const size = 256 << 20
	if err := BuildExt4(context.Background(), staging, img, size); err != nil {
		t.Fatalf("BuildExt4: %v", err)
	}
	st, err := os.Stat(img)
	if err != nil || st.Size() != size {
		t.Fatalf("image: %v, size %d, want %d", err, st.Size(), size)
	}
	e2fsckClean(t, img)
	got := statPaths(t, img, "/", "/etc/hostname", "/usr/bin/tool", "/var/empty")
	if got["/"].UID != 0 || got["/"].GID != 0 || got["/"].Type != "directory" {
		t.Errorf("root: %+v, want a directory owned 0:0", got["/"])
	}
	for _, p := range []string{"/etc/hostname", "/usr/bin/tool"} {
		if got[p].Type != "regular" {
			t.Errorf("%s: %+v", p, got[p])
		}
	}
	// Hardlinks stay one inode.
	var s script
	s.add("stat", qpath("/usr/bin/tool-hardlink"))
	out, err := runDebugfs(context.Background(), img, &s, false)
	if err != nil || !strings.Contains(string(out), "Links: 2") {
		t.Errorf("hardlink: %v\n%s", err, out)
	}

	// An existing path is never overwritten, and never removed.
	if err := BuildExt4(context.Background(), staging, img, size); err == nil {
		t.Errorf("BuildExt4 over an existing file succeeded")
	}
	if _, err := os.Stat(img); err != nil {
		t.Errorf("BuildExt4 removed a file it did not create: %v", err)
	}
}

func TestBuildExt4SizeTooSmall(t *testing.T) {
	requireE2fsprogs(t)
	staging := stageFiles(t, map[string]string{"big": strings.Repeat("x", 3<<20)})
	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	err := BuildExt4(context.Background(), staging, img, 64<<20)
	if !errors.Is(err, ErrSizeTooSmall) {
		t.Fatalf("BuildExt4 at 64 MiB = %v, want ErrSizeTooSmall", err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Errorf("a refused size left %s behind (%v)", img, err)
	}
}

// TestBuildExt4RemovesPartialFile: mkfs failing (here: cancelled) leaves
// nothing behind.
func TestBuildExt4RemovesPartialFile(t *testing.T) {
	requireE2fsprogs(t)
	staging := stageFiles(t, map[string]string{"a": "a"})
	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := BuildExt4(ctx, staging, img, 256<<20); !errors.Is(err, context.Canceled) {
		t.Fatalf("BuildExt4 with a cancelled context = %v, want context.Canceled", err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Errorf("cancelled BuildExt4 left %s behind (%v)", img, err)
	}
	// A staging dir that is not there fails before creating anything.
	if err := BuildExt4(context.Background(), filepath.Join(staging, "nope"), img, 256<<20); err == nil {
		t.Errorf("BuildExt4 of a missing staging dir succeeded")
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Errorf("failed BuildExt4 left %s behind (%v)", img, err)
	}
}

// TestBuildExt4InodeHeadroom: 17k empty files in a 256 MiB file system.
// mkfs.ext4's default ratio for file systems of 512 MiB and more (one inode
// per 16 KiB, forced here with -i so the test stays small) gives 16384
// inodes and fails; BuildExt4 sizes the inode table from the entry count.
func TestBuildExt4InodeHeadroom(t *testing.T) {
	requireE2fsprogs(t)
	testutil.SkipIfShort(t, "creates 20k files")
	staging := fastTempDir(t)
	const dirs, perDir = 34, 500
	for d := range dirs {
		dir := filepath.Join(staging, "d"+strconv.Itoa(d))
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		for f := range perDir {
			if err := os.WriteFile(filepath.Join(dir, strconv.Itoa(f)), nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	const size = 256 << 20
	// The default really does run out: this is what BuildExt4 avoids.
	plain := filepath.Join(t.TempDir(), "plain.ext4")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(plain, size); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-F", "-q", "-b", "4096", "-i", "16384", "-d", staging, plain).CombinedOutput(); err == nil {
		t.Fatalf("plain mkfs.ext4 -d fit %d entries at 256 MiB: the test no longer shows the problem (%s)", dirs*perDir, out)
	}

	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	if err := BuildExt4(context.Background(), staging, img, size); err != nil {
		t.Fatalf("BuildExt4: %v", err)
	}
	n, _ := strconv.Atoi(dumpe2fs(t, img, "Inode count"))
	free, _ := strconv.Atoi(dumpe2fs(t, img, "Free inodes"))
	if entries := dirs*perDir + dirs + 1; n < 2*entries || free < entries {
		t.Errorf("inode count %d, free %d for %d entries: want at least twice the entries", n, free, entries)
	}
	e2fsckClean(t, img)
}

func TestInodeCount(t *testing.T) {
	const GiB = 1 << 30
	if got := inodeCount(GiB, 100); got != GiB/16384 {
		t.Errorf("inodeCount(1 GiB, 100) = %d, want the default %d", got, GiB/16384)
	}
	if got := inodeCount(GiB, 100000); got != 2*100000+inodeMargin {
		t.Errorf("inodeCount(1 GiB, 100000) = %d", got)
	}
	if got := inodeCount(64<<20, 1000000); got != (64<<20)/4096 {
		t.Errorf("inodeCount is not capped at one per block: %d", got)
	}
}

// fastTempDir is a temporary directory on tmpfs (/dev/shm) when there is
// one: creating 17k files on this machine's disk takes about 20 s, on tmpfs
// under one.
func fastTempDir(t *testing.T) string {
	t.Helper()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if d, err := os.MkdirTemp("/dev/shm", "banger-test-"); err == nil {
			t.Cleanup(func() { _ = os.RemoveAll(d) })
			return d
		}
	}
	return t.TempDir()
}

func TestDiskUsage(t *testing.T) {
	md := Metadata{"": {Type: TypeDir}, "a": {Type: TypeRegular, Size: 1}, "b": {Type: TypeRegular, Size: 4097}, "c": {Type: TypeSymlink}, "d": {Type: TypeCharDev}}
	want := int64(4096 + 4096 + 8192 + (2*5+inodeMargin)*256)
	if got := DiskUsage(md); got != want {
		t.Errorf("DiskUsage = %d, want %d", got, want)
	}
	// A million 100-byte files: far more than their content.
	many := Metadata{"": {Type: TypeDir}}
	for i := range 1000000 {
		many[strconv.Itoa(i)] = FileMeta{Type: TypeRegular, Size: 100}
	}
	if got := DiskUsage(many); got < 4096*1000000 {
		t.Errorf("DiskUsage of 1M small files = %d, want at least 4 GB", got)
	}
	if err := CheckSize(DiskUsage(many), DefaultSize(DiskUsage(many))); err != nil {
		t.Errorf("CheckSize(DiskUsage, DefaultSize(DiskUsage)) = %v", err)
	}
}
