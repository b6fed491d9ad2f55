package imagecat

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// sparseFile writes a file of size bytes at p with data only at the given
// offsets (4 KiB of random bytes each) plus one all-zero data block that
// must come out as a hole, and returns its content.
func sparseFile(t *testing.T, p string, size int64, at []int64) []byte {
	t.Helper()
	want := make([]byte, size)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for _, off := range at {
		blk := make([]byte, min(extentBlock, size-off))
		for i := range blk {
			blk[i] = byte(r.UintN(256))
		}
		copy(want[off:], blk)
		if _, err := f.WriteAt(blk, off); err != nil {
			t.Fatal(err)
		}
	}
	// Explicit zeros: allocated on disk, but no data.
	if _, err := f.WriteAt(make([]byte, extentBlock), 8*extentBlock); err != nil {
		t.Fatal(err)
	}
	return want
}

func testMetadata(size int64) Metadata {
	return Metadata{Schema: SchemaVersion, Name: "debian-bookworm", Description: "Debian 12 with systemd and sshd",
		OS: OS{ID: "debian", Version: "12"}, KernelRef: "generic-6.1", RootFSSize: size, Created: time.Unix(1700000000, 0).UTC()}
}

func writeTestBundle(t *testing.T, in BundleInput) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := WriteBundle(context.Background(), &buf, in, WriteOptions{Level: zstd.SpeedFastest}); err != nil {
		t.Fatalf("WriteBundle: %v", err)
	}
	return buf.Bytes()
}

func allocated(t *testing.T, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestDataExtents(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	const size = 64 * extentBlock
	sparseFile(t, p, size, []int64{0, extentBlock, 10 * extentBlock, 40 * extentBlock})
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := DataExtents(context.Background(), f, size)
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]int64{{0, 2 * extentBlock}, {10 * extentBlock, extentBlock}, {40 * extentBlock, extentBlock}}
	if !equalExtents(got, want) {
		t.Errorf("DataExtents = %v, want %v (the zero block at 8*4K must be a hole)", got, want)
	}
}

func equalExtents(a, b [][2]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestBundleRoundTripKeepsHoles(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "rootfs.ext4")
	const size = 1024 * extentBlock // 4 MiB apparent
	want := sparseFile(t, src, size, []int64{0, 3 * extentBlock, 500 * extentBlock, size - extentBlock})
	kernel := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(kernel, []byte("kernel bytes"), 0o644); err != nil {
		t.Fatal(err)
	}
	md := testMetadata(size)
	md.Kernel = &KernelInfo{Version: "6.1.0-1-cloud-amd64", Format: "bzImage"}
	data := writeTestBundle(t, BundleInput{Metadata: md, RootFS: src, Kernel: kernel})

	dst := filepath.Join(dir, "out")
	if err := os.Mkdir(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	res, err := Unpack(context.Background(), bytes.NewReader(data), dst, nil)
	if err != nil {
		t.Fatalf("Unpack: %v", err)
	}
	if res.Metadata.Name != md.Name || res.Metadata.OS != md.OS || res.Metadata.RootFSSize != size || res.Metadata.Kernel == nil {
		t.Errorf("Unpack metadata = %+v, want %+v", res.Metadata, md)
	}
	got, err := os.ReadFile(res.RootFS)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("unpacked rootfs differs from the original (%d vs %d bytes)", len(got), len(want))
	}
	if k, _ := os.ReadFile(res.Kernel); string(k) != "kernel bytes" {
		t.Errorf("unpacked kernel = %q", k)
	}
	if res.DataBytes != 4*extentBlock+int64(len("kernel bytes")) {
		t.Errorf("DataBytes = %d, want %d", res.DataBytes, 4*extentBlock+12)
	}
	if a := allocated(t, res.RootFS); a > 8*extentBlock {
		t.Errorf("unpacked rootfs allocates %d bytes for 4 data blocks: holes were written", a)
	}
	if st, _ := os.Stat(res.RootFS); st.Mode().Perm() != 0o600 {
		t.Errorf("rootfs mode %v, want 0600", st.Mode().Perm())
	}
}

// rawBundle builds a bundle stream by hand, for hostile inputs.
type rawBundle struct{ buf bytes.Buffer }

func (r *rawBundle) bytes(b []byte) *rawBundle { r.buf.Write(b); return r }

func (r *rawBundle) header(h memberHeader) *rawBundle {
	hj, _ := json.Marshal(h)
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(hj)))
	r.buf.Write(n[:])
	r.buf.Write(hj)
	return r
}

func (r *rawBundle) metadata(md Metadata) *rawBundle {
	j, _ := json.Marshal(md)
	return r.header(memberHeader{Name: MemberMetadata, Size: int64(len(j)), Extents: [][2]int64{{0, int64(len(j))}}}).bytes(j)
}

func (r *rawBundle) zstd(t *testing.T) []byte {
	t.Helper()
	var out bytes.Buffer
	zw, err := zstd.NewWriter(&out)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := zw.Write(r.buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func TestUnpackRefusesHostileBundles(t *testing.T) {
	md := testMetadata(2 * extentBlock)
	blk := bytes.Repeat([]byte{7}, extentBlock)
	rootfs := memberHeader{Name: MemberRootFS, Size: 2 * extentBlock, Extents: [][2]int64{{0, extentBlock}}}
	good := func() *rawBundle {
		return new(rawBundle).bytes([]byte(BundleMagic)).metadata(md)
	}
	badMD := md
	badMD.Name = "../etc"
	cases := []struct {
		name string
		raw  *rawBundle
		want string
	}{
		{"bad magic", new(rawBundle).bytes([]byte("not-a-bundle/1\n\n")), "not a banger bundle"},
		{"path member", good().header(memberHeader{Name: "../../etc/passwd", Size: 1, Extents: [][2]int64{{0, 1}}}).bytes([]byte("x")), "unknown member"},
		{"rootfs first", new(rawBundle).bytes([]byte(BundleMagic)).header(rootfs).bytes(blk), "must come first"},
		{"bad metadata name", new(rawBundle).bytes([]byte(BundleMagic)).metadata(badMD), "metadata"},
		{"overlapping extents", good().header(memberHeader{Name: MemberRootFS, Size: 2 * extentBlock, Extents: [][2]int64{{0, extentBlock}, {100, 10}}}), "out of order"},
		{"extent past the end", good().header(memberHeader{Name: MemberRootFS, Size: 2 * extentBlock, Extents: [][2]int64{{extentBlock, 2 * extentBlock}}}), "outside"},
		{"negative extent", good().header(memberHeader{Name: MemberRootFS, Size: 2 * extentBlock, Extents: [][2]int64{{0, -1}}}), "outside"},
		{"rootfs size disagrees", good().header(memberHeader{Name: MemberRootFS, Size: 3 * extentBlock, Extents: [][2]int64{{0, extentBlock}}}).bytes(blk), "metadata says"},
		{"member twice", good().header(rootfs).bytes(blk).header(rootfs).bytes(blk), "twice"},
		{"end count wrong", good().header(rootfs).bytes(blk).header(memberHeader{End: true, Members: 5}), "end record"},
		{"data after end", good().header(rootfs).bytes(blk).header(memberHeader{End: true, Members: 2}).bytes([]byte("junk")), "after the end record"},
		{"no rootfs", good().header(memberHeader{End: true, Members: 1}), "no rootfs.ext4"},
		{"kernel without metadata.kernel", good().header(rootfs).bytes(blk).header(memberHeader{Name: MemberKernel, Size: 1, Extents: [][2]int64{{0, 1}}}).bytes([]byte("k")).header(memberHeader{End: true, Members: 3}), "disagree"},
		{"unknown header field", good().bytes([]byte{0, 0, 0, 12}).bytes([]byte(`{"evil":true}`)[:12]), "member header"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dst := t.TempDir()
			_, err := Unpack(context.Background(), bytes.NewReader(tc.raw.zstd(t)), dst, nil)
			if !errors.Is(err, ErrBadBundle) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Unpack = %v, want ErrBadBundle mentioning %q", err, tc.want)
			}
			if left, _ := os.ReadDir(dst); len(left) != 0 {
				t.Errorf("Unpack left %d files behind after failing", len(left))
			}
		})
	}
}

func TestUnpackTruncatedBundle(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "rootfs.ext4")
	const size = 256 * extentBlock
	offs := []int64{}
	for i := int64(0); i < 256; i += 2 {
		offs = append(offs, i*extentBlock)
	}
	sparseFile(t, src, size, offs)
	data := writeTestBundle(t, BundleInput{Metadata: testMetadata(size), RootFS: src})
	for _, cut := range []int{len(data) / 2, len(data) - 1, 10} {
		dst := t.TempDir()
		_, err := Unpack(context.Background(), bytes.NewReader(data[:cut]), dst, nil)
		if !errors.Is(err, ErrBadBundle) || !strings.Contains(err.Error(), "truncated") {
			t.Errorf("Unpack of the first %d of %d bytes = %v, want ErrBadBundle saying truncated", cut, len(data), err)
		}
		if left, _ := os.ReadDir(dst); len(left) != 0 {
			t.Errorf("cut at %d: Unpack left %d files behind", cut, len(left))
		}
	}
}

func TestUnpackCorruptByte(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "rootfs.ext4")
	sparseFile(t, src, 64*extentBlock, []int64{0, 5 * extentBlock})
	data := writeTestBundle(t, BundleInput{Metadata: testMetadata(64 * extentBlock), RootFS: src})
	data[len(data)/2] ^= 0xff
	_, err := Unpack(context.Background(), bytes.NewReader(data), t.TempDir(), nil)
	if !errors.Is(err, ErrBadBundle) {
		t.Fatalf("Unpack of a bundle with a flipped byte = %v, want ErrBadBundle", err)
	}
}

func TestUnpackCancelled(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "rootfs.ext4")
	sparseFile(t, src, 64*extentBlock, []int64{0})
	data := writeTestBundle(t, BundleInput{Metadata: testMetadata(64 * extentBlock), RootFS: src})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	dst := t.TempDir()
	if _, err := Unpack(ctx, bytes.NewReader(data), dst, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Unpack with a cancelled context = %v, want context.Canceled", err)
	}
	if left, _ := os.ReadDir(dst); len(left) != 0 {
		t.Errorf("cancelled Unpack left %d files", len(left))
	}
}
