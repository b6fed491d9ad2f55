package imagepull

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
)

// capNetRaw is a VFS_CAP_REVISION_2 security.capability value granting
// cap_net_raw (bit 13) permitted and effective, as ping carries it.
var capNetRaw = []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

func stageFiles(t *testing.T, files map[string]string, dirs ...string) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestApplyOwnership(t *testing.T) {
	requireE2fsprogs(t)
	staging := stageFiles(t, map[string]string{
		"usr/bin/sudo":  "sudo",
		"usr/bin/ping":  "ping",
		"etc/shadow":    "root:*:",
		"etc/sudoers":   "root ALL=(ALL) ALL",
		"home/big/file": "x",
		"run/initctl":   "placeholder for a fifo", // staged as a file: must become a FIFO
	}, "tmp", "dev", "var/mail")
	if err := os.Symlink("../usr/bin/sudo", filepath.Join(staging, "etc/sudo-link")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(staging, "dev/staged-fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	md := Metadata{
		"":                {Type: TypeDir, Mode: 0o755},
		"usr":             {Type: TypeDir, Mode: 0o755},
		"usr/bin":         {Type: TypeDir, Mode: 0o755},
		"usr/bin/sudo":    {Type: TypeRegular, Mode: 0o755 | fs.ModeSetuid},
		"usr/bin/ping":    {Type: TypeRegular, Mode: 0o755, Xattrs: map[string][]byte{"security.capability": capNetRaw, "user.note": []byte("a b\n\"c\"")}},
		"etc":             {Type: TypeDir, Mode: 0o755},
		"etc/shadow":      {Type: TypeRegular, GID: 42, Mode: 0o640},
		"etc/sudoers":     {Type: TypeRegular, Mode: 0o440},
		"etc/sudo-link":   {Type: TypeSymlink, UID: 7, GID: 8, Mode: 0o777},
		"tmp":             {Type: TypeDir, Mode: 0o777 | fs.ModeSticky},
		"var":             {Type: TypeDir, Mode: 0o755},
		"var/mail":        {Type: TypeDir, GID: 8, Mode: 0o775 | fs.ModeSetgid},
		"home":            {Type: TypeDir, Mode: 0o755},
		"home/big":        {Type: TypeDir, UID: 100000, GID: 200000, Mode: 0o700},
		"home/big/file":   {Type: TypeRegular, UID: 4294967294, GID: 65536, Mode: 0o600},
		"dev":             {Type: TypeDir, Mode: 0o755},
		"dev/null":        {Type: TypeCharDev, Mode: 0o666, DevMajor: 1, DevMinor: 3},
		"dev/loop0":       {Type: TypeBlockDev, GID: 6, Mode: 0o660, DevMajor: 7, DevMinor: 0},
		"dev/<12>":        {Type: TypeFIFO, Mode: 0o600},
		"dev/-fifo x":     {Type: TypeFIFO, Mode: 0o620, UID: 3},
		"dev/staged-fifo": {Type: TypeFIFO, Mode: 0o644, UID: 5},
		"run":             {Type: TypeDir, Mode: 0o755},
		"run/initctl":     {Type: TypeFIFO, Mode: 0o600},
	}
	img := mkfsStaging(t, staging)
	ctx := context.Background()
	if err := ApplyOwnership(ctx, img, md); err != nil {
		t.Fatalf("ApplyOwnership: %v", err)
	}
	want := map[string]inodeInfo{
		"/":                {Type: "directory", Mode: 0o755},
		"/usr/bin/sudo":    {Type: "regular", Mode: 0o4755},
		"/usr/bin/ping":    {Type: "regular", Mode: 0o755},
		"/etc/shadow":      {Type: "regular", Mode: 0o640, GID: 42},
		"/etc/sudoers":     {Type: "regular", Mode: 0o440},
		"/etc/sudo-link":   {Type: "symlink", Mode: 0o777, UID: 7, GID: 8, Target: "../usr/bin/sudo"},
		"/tmp":             {Type: "directory", Mode: 0o1777},
		"/var/mail":        {Type: "directory", Mode: 0o2775, GID: 8},
		"/home/big":        {Type: "directory", Mode: 0o700, UID: 100000, GID: 200000},
		"/home/big/file":   {Type: "regular", Mode: 0o600, UID: 4294967294, GID: 65536},
		"/dev/null":        {Type: "character special", Mode: 0o666, Major: 1, Minor: 3},
		"/dev/loop0":       {Type: "block special", Mode: 0o660, GID: 6, Major: 7},
		"/dev/<12>":        {Type: "FIFO", Mode: 0o600},
		"/dev/-fifo x":     {Type: "FIFO", Mode: 0o620, UID: 3},
		"/dev/staged-fifo": {Type: "FIFO", Mode: 0o644, UID: 5},
		"/run/initctl":     {Type: "FIFO", Mode: 0o600},
	}
	checkInodes(t, img, want)
	if got := eaGet(t, img, "/usr/bin/ping", "security.capability"); !bytes.Equal(got, capNetRaw) {
		t.Errorf("security.capability of /usr/bin/ping = %x, want %x", got, capNetRaw)
	}
	if got := eaGet(t, img, "/usr/bin/ping", "user.note"); string(got) != "a b\n\"c\"" {
		t.Errorf("user.note of /usr/bin/ping = %q", got)
	}
	e2fsckClean(t, img)

	// Applying again changes nothing and does not fail on the devices
	// that now exist.
	if err := ApplyOwnership(ctx, img, md); err != nil {
		t.Fatalf("second ApplyOwnership: %v", err)
	}
	checkInodes(t, img, want)
	e2fsckClean(t, img)
}

func checkInodes(t *testing.T, img string, want map[string]inodeInfo) {
	t.Helper()
	paths := make([]string, 0, len(want))
	for p := range want {
		paths = append(paths, p)
	}
	got := statPaths(t, img, paths...)
	for _, p := range paths {
		if got[p] != want[p] {
			t.Errorf("%q: got %+v, want %+v", p, got[p], want[p])
		}
	}
}

// eaGet reads an xattr value back with debugfs ea_get -f.
func eaGet(t *testing.T, img, p, name string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "value")
	var s script
	s.add("ea_get", lit("-f"), qpath(out), qpath(p), lit(name))
	if _, err := runDebugfs(context.Background(), img, &s, false); err != nil {
		t.Fatalf("ea_get %s %s: %v", p, name, err)
	}
	v, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestApplyOwnershipRefusesHostileNames: a caller that skipped Flatten
// hands ApplyOwnership a name that would inject a root shell command.
// Nothing runs, the marker is never created, the error names the entry.
func TestApplyOwnershipRefusesHostileNames(t *testing.T) {
	requireE2fsprogs(t)
	marker := filepath.Join(t.TempDir(), "pwned")
	img := mkfsStaging(t, stageFiles(t, map[string]string{"etc/x": "x"}))
	for _, name := range []string{
		"etc/x\n!touch " + marker,
		"etc/x\r!touch " + marker,
		"etc/\x00x",
		"etc/\x7f",
		"etc/" + string(bytes.Repeat([]byte("a/"), MaxNameBytes/2)) + "\n!touch " + marker,
	} {
		md := Metadata{"etc/x": {Type: TypeRegular, Mode: 0o600, UID: 9}, name: {Type: TypeRegular, Mode: 0o644}}
		err := ApplyOwnership(context.Background(), img, md)
		if !errors.Is(err, ErrHostileName) {
			t.Errorf("ApplyOwnership with %q = %v, want ErrHostileName", name, err)
		}
		if _, statErr := os.Stat(marker); statErr == nil {
			t.Fatalf("debugfs ran the injected command for %q", name)
		}
	}
	// Nothing was applied: etc/x keeps the staged owner.
	if got := statPaths(t, img, "/etc/x")["/etc/x"]; got.UID == 9 {
		t.Errorf("/etc/x got uid 9: part of a refused batch was applied")
	}
	// The bad-metadata cases.
	for name, m := range map[string]FileMeta{
		"etc/x":      {Type: TypeHardlink},
		"etc/../../": {Type: TypeRegular},
		"etc/y":      {Type: TypeRegular, UID: -1},
		"etc/z":      {Type: TypeRegular, Xattrs: map[string][]byte{"-r": nil}},
	} {
		if err := ApplyOwnership(context.Background(), img, Metadata{name: m}); !errors.Is(err, ErrBadMetadata) {
			t.Errorf("ApplyOwnership(%q: %+v) = %v, want ErrBadMetadata", name, m, err)
		}
	}
}

// TestApplyOwnershipReportsDebugfsErrors: debugfs exits 0 when a command
// fails; ApplyOwnership must still fail.
func TestApplyOwnershipReportsDebugfsErrors(t *testing.T) {
	requireE2fsprogs(t)
	img := mkfsStaging(t, stageFiles(t, map[string]string{"etc/x": "x"}))
	err := ApplyOwnership(context.Background(), img, Metadata{"etc/missing": {Type: TypeRegular, Mode: 0o644}})
	if !errors.Is(err, ErrDebugfs) {
		t.Fatalf("ApplyOwnership on a missing path = %v, want ErrDebugfs", err)
	}
	if !bytes.Contains([]byte(err.Error()), []byte("/etc/missing")) {
		t.Errorf("error %q does not name the path", err)
	}
}

// tarLayer is a LayerSource of one uncompressed tar file.
type tarLayer string

func (l tarLayer) Layers() []Layer {
	return []Layer{{Digest: "sha256:test", MediaType: "application/vnd.oci.image.layer.v1.tar"}}
}

func (l tarLayer) OpenLayer(context.Context, int) (io.ReadCloser, error) { return os.Open(string(l)) }

// tarTruth reads what a tar says about every path (last entry wins;
// hardlinks are skipped: they share their target's inode).
func tarTruth(t *testing.T, tarPath string) map[string]*tar.Header {
	t.Helper()
	f, err := os.Open(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]*tar.Header{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := "/" + strings.Trim(path.Clean("/"+h.Name), "/")
		if h.Typeflag == tar.TypeLink {
			continue
		}
		out[p] = h
	}
	return out
}

var tarKind = map[byte]string{
	tar.TypeReg: "regular", tar.TypeDir: "directory", tar.TypeSymlink: "symlink",
	tar.TypeChar: "character special", tar.TypeBlock: "block special", tar.TypeFifo: "FIFO",
}

// TestDebianRootfs runs the whole ext4 half on the real Debian test root
// filesystem (about 245 MB, 11k entries): Flatten, BuildExt4,
// ApplyOwnership, InjectGuestAgents. Every path's type, mode (setuid,
// setgid, sticky included), uid, gid, device numbers and xattrs must match
// the tar, and e2fsck must find nothing. It logs each phase's duration.
func TestDebianRootfs(t *testing.T) {
	requireE2fsprogs(t)
	testutil.SkipIfShort(t, "builds a 1 GiB image from the Debian test root filesystem")
	tarPath := testutil.DebianRootfsTar(t, "std", nil)
	ctx := context.Background()
	staging := fastTempDir(t)
	if err := os.Chmod(staging, 0o700); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	md, err := Flatten(ctx, tarLayer(tarPath), staging, FlattenOptions{})
	if err != nil {
		t.Fatalf("Flatten: %v", err)
	}
	tFlatten := time.Since(start)

	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	size := DefaultSize(DiskUsage(md))
	start = time.Now()
	if err := BuildExt4(ctx, staging, img, size); err != nil {
		t.Fatalf("BuildExt4: %v", err)
	}
	tMkfs := time.Since(start)
	start = time.Now()
	if err := ApplyOwnership(ctx, img, md); err != nil {
		t.Fatalf("ApplyOwnership: %v", err)
	}
	tOwn := time.Since(start)
	start = time.Now()
	if err := InjectGuestAgents(ctx, img, GuestAssets{AgentBinary: fakeAgent(t, "agent")}); err != nil {
		t.Fatalf("InjectGuestAgents: %v", err)
	}
	tInject := time.Since(start)
	t.Logf("%d entries, %d MiB content, image %d MiB: flatten %v, mkfs %v, ownership %v, inject %v",
		len(md), md.ContentBytes()>>20, size>>20, tFlatten.Round(time.Millisecond), tMkfs.Round(time.Millisecond),
		tOwn.Round(time.Millisecond), tInject.Round(time.Millisecond))

	checkAgainstTar(t, img, tarPath)
}

// checkAgainstTar compares every path of the ext4 image img with the tar
// it was built from: type, mode (setuid, setgid, sticky included), uid,
// gid, device numbers, symlink targets, xattrs; and runs e2fsck.
func checkAgainstTar(t *testing.T, img, tarPath string) {
	t.Helper()
	truth := tarTruth(t, tarPath)
	paths := make([]string, 0, len(truth))
	for p := range truth {
		paths = append(paths, p)
	}
	got := statPaths(t, img, paths...)
	bad := 0
	for _, p := range paths {
		h := truth[p]
		want := inodeInfo{Type: tarKind[h.Typeflag], Mode: uint32(h.Mode & 0o7777), UID: h.Uid, GID: h.Gid} // #nosec G115 -- mode bits
		if h.Typeflag == tar.TypeChar || h.Typeflag == tar.TypeBlock {
			want.Major, want.Minor = int(h.Devmajor), int(h.Devminor)
		}
		if h.Typeflag == tar.TypeSymlink {
			// debugfs stat prints only fast (inline, < 60 bytes) targets.
			want.Target = got[p].Target
			if len(h.Linkname) < 60 {
				want.Target = h.Linkname
			}
		}
		if got[p] != want {
			if bad++; bad <= 20 {
				t.Errorf("%q: ext4 %+v, tar %+v", p, got[p], want)
			}
		}
		for k, v := range h.PAXRecords {
			name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
			if !ok {
				continue
			}
			if ev := eaGet(t, img, p, name); normalizeACL(name, ev) != normalizeACL(name, []byte(v)) {
				t.Errorf("%q xattr %s: ext4 %x, tar %x", p, name, ev, v)
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d of %d paths differ", bad, len(paths))
	}
	for p, w := range map[string]inodeInfo{
		"/usr/bin/sudo": {Type: "regular", Mode: 0o4755},
		"/etc/shadow":   {Type: "regular", Mode: 0o640, GID: 42},
		"/tmp":          {Type: "directory", Mode: 0o1777},
	} {
		if got[p] != w {
			t.Errorf("%s: %+v, want %+v", p, got[p], w)
		}
	}
	e2fsckClean(t, img)
}

// normalizeACL makes a POSIX ACL xattr value comparable: the id of an entry
// other than a named user (2) or group (8) means nothing; the kernel writes
// 0xffffffff there, libext2fs reads it back as 0 (ext4 stores no id for
// those entries at all).
func normalizeACL(name string, v []byte) string {
	if name != "system.posix_acl_access" && name != "system.posix_acl_default" || len(v) < 4 || (len(v)-4)%8 != 0 {
		return string(v)
	}
	out := bytes.Clone(v)
	for off := 4; off+8 <= len(out); off += 8 {
		if tag := int(out[off]) | int(out[off+1])<<8; tag != 2 && tag != 8 {
			copy(out[off+4:off+8], []byte{0xff, 0xff, 0xff, 0xff})
		}
	}
	return string(out)
}
