package imagepull

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// flattenLayers pushes layers as one image to a fresh in-process registry,
// pulls it and flattens it.
func flattenLayers(t *testing.T, opts FlattenOptions, layers ...[]byte) (Metadata, string, error) {
	t.Helper()
	reg := newRegistry(t, nil)
	ref := reg.pushLayers(t, "test/img:v1", layers...)
	return pullFlatten(t, &Cache{Dir: t.TempDir()}, ref, opts)
}

func mustFlatten(t *testing.T, layers ...[]byte) (Metadata, string) {
	t.Helper()
	md, staging, err := flattenLayers(t, FlattenOptions{}, layers...)
	if err != nil {
		t.Fatalf("Flatten: %v", err)
	}
	checkMirror(t, md, staging)
	return md, staging
}

// checkMirror asserts the Metadata contract: staging holds exactly the
// regular files, directories and symlinks of md, with those types, and no
// setuid/setgid/sticky bits; devices and FIFOs are only in md.
func checkMirror(t testing.TB, md Metadata, staging string) {
	t.Helper()
	seen := map[string]bool{}
	err := filepath.WalkDir(staging, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(staging, p)
		if rel == "." {
			rel = ""
		}
		seen[rel] = true
		m, ok := md[rel]
		if !ok {
			t.Errorf("staging has %q, Metadata does not", rel)
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		want := map[FileType]fs.FileMode{TypeRegular: 0, TypeDir: fs.ModeDir, TypeSymlink: fs.ModeSymlink}[m.Type]
		if info.Mode().Type() != want {
			t.Errorf("staging %q has type %v, Metadata says %d", rel, info.Mode().Type(), m.Type)
		}
		if info.Mode()&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != 0 {
			t.Errorf("staging %q has mode %v: special bits must stay out of staging", rel, info.Mode())
		}
		if m.Type == TypeRegular && info.Size() != m.Size {
			t.Errorf("staging %q is %d bytes, Metadata says %d", rel, info.Size(), m.Size)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for rel, m := range md {
		special := m.Type == TypeCharDev || m.Type == TypeBlockDev || m.Type == TypeFIFO
		if special == seen[rel] {
			t.Errorf("Metadata %q (type %d): in staging = %v", rel, m.Type, seen[rel])
		}
	}
}

func readFile(t testing.TB, staging, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(staging, rel))
	if err != nil {
		t.Fatalf("read %s: %v", rel, err)
	}
	return string(b)
}

func paths(md Metadata) []string {
	var out []string
	for p := range md {
		out = append(out, p)
	}
	return sortStrings(out)
}

func sortStrings(s []string) []string {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
	return s
}

func TestFlattenWhiteouts(t *testing.T) {
	md, staging := mustFlatten(t,
		makeTar(t, dir("a"), file("a/x", "x"), file("a/y", "y"), file("b", "b"), dir("c"), file("c/old", "old"), dir("keep"), file("keep/k", "k")),
		makeTar(t, file(".wh.b", ""), file("a/.wh.x", ""), file(".wh.nothere", ""),
			// whiteout and re-creation in one layer, whiteout last: only this layer's c stays
			dir("c"), file("c/new", "new"), file(".wh.c", "")),
	)
	want := []string{"", "a", "a/y", "c", "c/new", "keep", "keep/k"}
	if diff := cmp.Diff(want, paths(md)); diff != "" {
		t.Errorf("paths after whiteouts (-want +got):\n%s", diff)
	}
	if got := readFile(t, staging, "c/new"); got != "new" {
		t.Errorf("c/new = %q", got)
	}
}

func TestFlattenOpaqueDirs(t *testing.T) {
	md, _ := mustFlatten(t,
		makeTar(t, dir("d"), file("d/old1", "1"), dir("d/sub"), file("d/sub/old2", "2"), dir("d/kept"), file("d/kept/old3", "3"), file("other", "o")),
		// The new entries come before and after the marker: neither order may lose them.
		makeTar(t, dir("d"), file("d/new", "n"), dir("d/kept"), file("d/kept/new3", "3"), file("d/.wh..wh..opq", ""), dir("d/sub2"), file("d/sub2/new2", "2")),
	)
	want := []string{"", "d", "d/kept", "d/kept/new3", "d/new", "d/sub2", "d/sub2/new2", "other"}
	if diff := cmp.Diff(want, paths(md)); diff != "" {
		t.Errorf("paths after opaque dir (-want +got):\n%s", diff)
	}
}

func TestFlattenTypeChanges(t *testing.T) {
	md, staging := mustFlatten(t,
		makeTar(t, dir("p"), file("p/child", "c"), file("f", "file"), symlink("s", "target")),
		makeTar(t, file("p", "now a file"), dir("f"), file("f/inside", "i"), dir("s")),
		makeTar(t, dir("p"), file("p/z", "z"), symlink("f", "/elsewhere")),
	)
	want := []string{"", "f", "p", "p/z", "s"}
	if diff := cmp.Diff(want, paths(md)); diff != "" {
		t.Errorf("paths (-want +got):\n%s", diff)
	}
	if md["p"].Type != TypeDir || md["f"].Type != TypeSymlink || md["s"].Type != TypeDir {
		t.Errorf("types: p=%d f=%d s=%d", md["p"].Type, md["f"].Type, md["s"].Type)
	}
	if got, _ := os.Readlink(filepath.Join(staging, "f")); got != "/elsewhere" {
		t.Errorf("f -> %q", got)
	}
}

func TestFlattenDuplicateEntriesLastWins(t *testing.T) {
	d1 := dir("d")
	d2 := dir("d")
	d2.mode, d2.uid = 0o700, 42
	md, staging := mustFlatten(t, makeTar(t, file("dup", "one"), d1, file("d/x", "x"), file("dup", "two"), d2))
	if got := readFile(t, staging, "dup"); got != "two" {
		t.Errorf("dup = %q, want the last entry's content", got)
	}
	if md["d"].Mode != 0o700 || md["d"].UID != 42 || md["d/x"].Type != TypeRegular {
		t.Errorf("d = %+v, d/x = %+v: want the last dir entry's metadata and the contents kept", md["d"], md["d/x"])
	}
}

func inode(t testing.TB, p string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestFlattenHardlinks(t *testing.T) {
	setuid := file("bin/su", "su-binary")
	setuid.mode, setuid.uid = 0o4755, 0
	md, staging := mustFlatten(t,
		makeTar(t, dir("bin"), setuid, hardlink("bin/su2", "bin/su"),
			file("t1", "orig1"), hardlink("h1", "t1"),
			file("t2", "orig2"), hardlink("h2", "/t2"),
			// within one layer, the link keeps the content as of the link
			file("f", "v1"), hardlink("g", "f"), file("f", "v2"),
			symlink("sl", "t1"), hardlink("slh", "sl")),
		// #2002: a later layer overwrites the target; #977: it removes it
		makeTar(t, file("t1", "replaced"), file(".wh.t2", ""), hardlink("h3", "bin/su")),
	)
	for rel, want := range map[string]string{"h1": "orig1", "t1": "replaced", "h2": "orig2", "g": "v1", "f": "v2", "h3": "su-binary"} {
		if got := readFile(t, staging, rel); got != want {
			t.Errorf("%s = %q, want %q", rel, got, want)
		}
	}
	if _, ok := md["t2"]; ok {
		t.Error("t2 survived its whiteout")
	}
	if inode(t, filepath.Join(staging, "bin/su")) != inode(t, filepath.Join(staging, "h3")) {
		t.Error("h3 is not a hardlink of bin/su")
	}
	if inode(t, filepath.Join(staging, "sl")) != inode(t, filepath.Join(staging, "slh")) || md["slh"].Type != TypeSymlink {
		t.Error("slh is not a hardlink of the symlink sl")
	}
	for _, rel := range []string{"bin/su2", "h3"} {
		if diff := cmp.Diff(md["bin/su"], md[rel]); diff != "" {
			t.Errorf("Metadata of hardlink %s differs from its target (-target +link):\n%s", rel, diff)
		}
	}
	if md["bin/su"].Mode != fs.ModeSetuid|0o755 {
		t.Errorf("bin/su mode = %v, want setuid 0755", md["bin/su"].Mode)
	}
}

func TestFlattenSymlinksPreserved(t *testing.T) {
	md, staging := mustFlatten(t, makeTar(t,
		symlink("abs", "/etc/passwd"), symlink("rel", "../../usr/bin/x"), symlink("dangling", "nope"),
		symlink("dot", "."), symlink("weird", "a//b/./c/"), dir("usr"), symlink("usr/lib64", "lib")))
	for rel, want := range map[string]string{"abs": "/etc/passwd", "rel": "../../usr/bin/x", "dangling": "nope", "dot": ".", "weird": "a//b/./c/", "usr/lib64": "lib"} {
		got, err := os.Readlink(filepath.Join(staging, rel))
		if err != nil || got != want {
			t.Errorf("readlink %s = %q, %v; want %q", rel, got, err, want)
		}
		if md[rel].Type != TypeSymlink {
			t.Errorf("%s type %d", rel, md[rel].Type)
		}
	}
}

func TestFlattenMetadata(t *testing.T) {
	sudo := file("usr/bin/sudo", "sudo")
	sudo.mode, sudo.uid, sudo.gid = 0o4711, 0, 0
	shadow := file("etc/shadow", "root:*:")
	shadow.mode, shadow.gid = 0o640, 42
	tmp := dir("tmp")
	tmp.mode = 0o1777
	sgid := dir("var/mail")
	sgid.mode, sgid.gid = 0o2775, 8
	user := file("home/u/f", "u")
	user.uid, user.gid = 1000, 1001
	ping := file("usr/bin/ping", "ping")
	ping.mode = 0o755
	cap := "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
	ping.xattrs = map[string]string{"security.capability": cap, "user.note": "hi", "com.apple.quarantine": "ignored"}
	null := entry{name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3}
	sda := entry{name: "dev/sda", typ: tar.TypeBlock, mode: 0o660, major: 8, minor: 0, gid: 6}
	fifo := entry{name: "run/initctl", typ: tar.TypeFifo, mode: 0o600}
	md, staging := mustFlatten(t, makeTar(t, dir("etc"), shadow, sudo, tmp, sgid, user, ping, dir("dev"), null, sda, fifo, hardlink("dev/null2", "dev/null")))

	want := map[string]FileMeta{
		"usr/bin/sudo": {Type: TypeRegular, Mode: fs.ModeSetuid | 0o711, Size: 4},
		"etc/shadow":   {Type: TypeRegular, Mode: 0o640, GID: 42, Size: 7},
		"tmp":          {Type: TypeDir, Mode: fs.ModeSticky | 0o777},
		"var/mail":     {Type: TypeDir, Mode: fs.ModeSetgid | 0o775, GID: 8},
		"var":          {Type: TypeDir, Mode: 0o755}, // implicit parent
		"home/u/f":     {Type: TypeRegular, Mode: 0o644, UID: 1000, GID: 1001, Size: 1},
		"usr/bin/ping": {Type: TypeRegular, Mode: 0o755, Size: 4, Xattrs: map[string][]byte{"security.capability": []byte(cap), "user.note": []byte("hi")}},
		"dev/null":     {Type: TypeCharDev, Mode: 0o666, DevMajor: 1, DevMinor: 3},
		"dev/null2":    {Type: TypeCharDev, Mode: 0o666, DevMajor: 1, DevMinor: 3},
		"dev/sda":      {Type: TypeBlockDev, Mode: 0o660, GID: 6, DevMajor: 8},
		"run/initctl":  {Type: TypeFIFO, Mode: 0o600},
	}
	for rel, w := range want {
		if diff := cmp.Diff(w, md[rel]); diff != "" {
			t.Errorf("Metadata[%q] (-want +got):\n%s", rel, diff)
		}
	}
	st, err := os.Stat(filepath.Join(staging, "usr/bin/sudo"))
	if err != nil || st.Mode() != 0o711|0o600 {
		t.Errorf("staged sudo mode = %v, %v; want 0711|u+rw and no setuid", st.Mode(), err)
	}
	if got := md.ContentBytes(); got != 4+7+1+4 {
		t.Errorf("ContentBytes = %d, want 16", got)
	}
}

// legitOddNames are legitimate names debugfs must get right; Flatten must keep
// them byte for byte.
var legitOddNames = []string{
	"with space", `quo"te`, "dq\"\"x", "#hash", "!bang", "-leading-dash", "<12>", `back\slash`, "trailing ",
	strings.Repeat("n", 255), "\xff\xfe-not-utf8", "émoji-☃", "'single'", "$(echo x)", "*?[",
}

func TestFlattenOddNames(t *testing.T) {
	var es []entry
	es = append(es, dir("odd"))
	for i, n := range legitOddNames {
		e := file("odd/"+n, n)
		e.uid = 1000 + i
		es = append(es, e)
	}
	es = append(es, dir("odd/<7> dir #!"), file("odd/<7> dir #!/-x", "x"), symlink("odd/link -> ", "<12>"))
	md, staging := mustFlatten(t, makeTar(t, es...))
	for i, n := range legitOddNames {
		if got := readFile(t, staging, "odd/"+n); got != n {
			t.Errorf("content of %q = %q", n, got)
		}
		if md["odd/"+n].UID != 1000+i {
			t.Errorf("uid of %q = %d", n, md["odd/"+n].UID)
		}
	}
	if got := readFile(t, staging, "odd/<7> dir #!/-x"); got != "x" {
		t.Errorf("odd dir content = %q", got)
	}
}

// hostile is one layer stack Flatten must refuse.
type hostile struct {
	name   string
	layers [][]byte
	// the refused entry and the layer index it is in
	entry  string
	layer  int
	target error
}

func hostileCorpus(t testing.TB, outside string) []hostile {
	bomb := file("bomb", strings.Repeat("\x00", 8<<20))
	return []hostile{
		{"dotdot", [][]byte{makeTar(t, file("../escape", "x"))}, "../escape", 0, ErrUnsafeEntry},
		{"dotdot-inner", [][]byte{makeTar(t, dir("a"), file("a/../../escape", "x"))}, "a/../../escape", 0, ErrUnsafeEntry},
		{"absolute-escape", [][]byte{makeTar(t, file("/../../../escape", "x"))}, "/../../../escape", 0, ErrUnsafeEntry},
		{"symlink-rel-across-layers", [][]byte{makeTar(t, symlink("evil", "../outside")), makeTar(t, file("evil/pwned", "x"))}, "evil/pwned", 1, ErrUnsafeEntry},
		{"symlink-abs-across-layers", [][]byte{makeTar(t, symlink("evil", outside)), makeTar(t, dir("evil/sub"))}, "evil/sub", 1, ErrUnsafeEntry},
		{"symlink-same-layer", [][]byte{makeTar(t, symlink("evil", "/"), file("evil/"+strings.TrimPrefix(outside, "/")+"/pwned", "x"))}, "evil/" + strings.TrimPrefix(outside, "/") + "/pwned", 0, ErrUnsafeEntry},
		{"symlink-root-dir", [][]byte{makeTar(t, symlink("etc", "/etc")), makeTar(t, file("etc/passwd", "x"))}, "etc/passwd", 1, ErrUnsafeEntry},
		{"hardlink-dotdot", [][]byte{makeTar(t, hardlink("h", "../outside/x"))}, "h", 0, ErrUnsafeEntry},
		{"hardlink-abs-outside", [][]byte{makeTar(t, hardlink("h", "/etc/passwd"))}, "h", 0, ErrBadEntry},
		{"hardlink-via-symlink", [][]byte{makeTar(t, symlink("s", "/etc"), hardlink("h", "s/passwd"))}, "h", 0, ErrBadEntry},
		{"newline-bang", [][]byte{makeTar(t, file("x\n!touch "+outside+"/marker", "x"))}, "x\n!touch " + outside + "/marker", 0, ErrUnsafeEntry},
		{"cr", [][]byte{makeTar(t, file("x\rls", "x"))}, "x\rls", 0, ErrUnsafeEntry},
		{"control-1", [][]byte{makeTar(t, file("a\x01b", "x"))}, "a\x01b", 0, ErrUnsafeEntry},
		{"control-1f-dir", [][]byte{makeTar(t, dir("d\x1f"))}, "d\x1f", 0, ErrUnsafeEntry},
		{"del", [][]byte{makeTar(t, file("a\x7f", "x"))}, "a\x7f", 0, ErrUnsafeEntry},
		{"escape-seq-layer2", [][]byte{makeTar(t, file("ok", "x")), makeTar(t, file("\x1b[31mred", "x"))}, "\x1b[31mred", 1, ErrUnsafeEntry},
		{"hardlink-target-control", [][]byte{makeTar(t, file("ok", "x"), hardlink("h", "ok\n!id"))}, "h", 0, ErrUnsafeEntry},
		{"whiteout-dotdot", [][]byte{makeTar(t, dir("a")), makeTar(t, file("a/.wh...", ""))}, "a/.wh...", 1, ErrUnsafeEntry},
		{"whiteout-dot", [][]byte{makeTar(t, dir("a")), makeTar(t, file("a/.wh..", ""))}, "a/.wh..", 1, ErrUnsafeEntry},
		{"whiteout-through-symlink", [][]byte{makeTar(t, symlink("s", "../outside")), makeTar(t, file("s/.wh.x", ""))}, "s/.wh.x", 1, ErrUnsafeEntry},
		{"opaque-through-symlink", [][]byte{makeTar(t, symlink("s", outside)), makeTar(t, file("s/.wh..wh..opq", ""))}, "s/.wh..wh..opq", 1, ErrUnsafeEntry},
		{"gzip-bomb", [][]byte{makeTar(t, file("small", "x")), makeTar(t, bomb)}, "bomb", 1, ErrTooLarge},
		{"xattr-name", [][]byte{makeTar(t, entry{name: "x", typ: tar.TypeReg, mode: 0o644, xattrs: map[string]string{"security.a\nb": "v"}})}, "x", 0, ErrUnsafeEntry},
		{"xattr-at", [][]byte{makeTar(t, entry{name: "x", typ: tar.TypeReg, mode: 0o644, xattrs: map[string]string{"user.a@b": "v"}})}, "x", 0, ErrUnsafeEntry},
		{"xattr-system", [][]byte{makeTar(t, entry{name: "x", typ: tar.TypeReg, mode: 0o644, xattrs: map[string]string{"system.data": "v"}})}, "x", 0, ErrUnsafeEntry},
		{"long-component", [][]byte{makeTar(t, file(strings.Repeat("a", 256), "x"))}, strings.Repeat("a", 256), 0, ErrUnsafeEntry},
	}
}

func TestFlattenHostileCorpus(t *testing.T) {
	reg := newRegistry(t, nil)
	cache := &Cache{Dir: t.TempDir()}
	// The symlinks point at a real directory, which must stay empty.
	outside := t.TempDir()
	for _, h := range hostileCorpus(t, outside) {
		t.Run(h.name, func(t *testing.T) {
			ref := reg.pushLayers(t, "hostile/"+strings.ToLower(h.name)+":v1", h.layers...)
			img, err := Pull(context.Background(), ref, PullOptions{Cache: cache})
			if err != nil {
				t.Fatal(err)
			}
			base := t.TempDir()
			staging, sibling := filepath.Join(base, "staging"), filepath.Join(base, "outside")
			os.Mkdir(staging, 0o700)
			os.Mkdir(sibling, 0o700)
			// A stale staging path (the symlink escape targets ../outside
			// relative to staging) must not be followed either.
			_, err = Flatten(context.Background(), img, staging, FlattenOptions{MaxBytes: 1 << 20})
			if !errors.Is(err, h.target) {
				t.Fatalf("Flatten = %v, want %v", err, h.target)
			}
			var ee *EntryError
			if !errors.As(err, &ee) {
				t.Fatalf("Flatten error %v is not an *EntryError", err)
			}
			wantDigest := img.Layers()[h.layer].Digest
			if ee.Entry != h.entry || ee.Layer != h.layer || ee.Digest != wantDigest {
				t.Errorf("error names entry %q layer %d (%s), want %q layer %d (%s)", ee.Entry, ee.Layer, ee.Digest, h.entry, h.layer, wantDigest)
			}
			if !strings.Contains(err.Error(), wantDigest) || !strings.Contains(err.Error(), "layer ") {
				t.Errorf("error %q does not name the layer", err)
			}
			for _, d := range []string{sibling, outside} {
				if ents, _ := os.ReadDir(d); len(ents) != 0 {
					t.Errorf("%s outside staging has %v after Flatten", d, ents)
				}
			}
			if ents, _ := os.ReadDir(base); len(ents) != 2 {
				t.Errorf("staging's parent has %d entries, want 2", len(ents))
			}
		})
	}
	if _, err := os.Lstat(filepath.Join(outside, "marker")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("marker exists: %v", err)
	}
}

func TestFlattenStagingMustBeEmpty(t *testing.T) {
	staging := t.TempDir()
	os.WriteFile(filepath.Join(staging, "x"), nil, 0o600)
	if _, err := Flatten(context.Background(), memSource(nil), staging, FlattenOptions{}); err == nil {
		t.Fatal("Flatten into a non-empty dir succeeded")
	}
}

// memSource is a LayerSource over uncompressed layer tars (fuzzing).
type memSource [][]byte

func (m memSource) Layers() []Layer {
	out := make([]Layer, len(m))
	for i := range m {
		out[i] = Layer{Digest: "sha256:" + strings.Repeat("0", 63) + string(rune('0'+i%10))}
	}
	return out
}

func (m memSource) OpenLayer(_ context.Context, i int) (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(m[i])), nil
}

// fuzzSeeds are layer pairs for FuzzFlatten: the semantic cases and the
// hostile corpus. testdata/fuzz/FuzzFlatten holds the same seeds
// (regenerate with BANGER_WRITE_FUZZ_CORPUS=1 go test -run TestWriteFuzzCorpus).
func fuzzSeeds(t testing.TB) [][2][]byte {
	seeds := [][2][]byte{
		{makeTar(t, dir("a"), file("a/x", "x"), file("b", "b"), hardlink("h", "b"), symlink("s", "/etc")), makeTar(t, file(".wh.b", ""), file("a/.wh..wh..opq", ""), file("a/n", "n"))},
		{makeTar(t, dir("p"), file("p/c", "c")), makeTar(t, file("p", "f"), dir("p"), hardlink("q", "p/c"))},
		{makeTar(t, entry{name: "dev/null", typ: tar.TypeChar, major: 1, minor: 3, mode: 0o666}, hardlink("n2", "dev/null")), makeTar(t, file("dev/.wh.null", ""))},
	}
	for _, h := range hostileCorpus(t, "/tmp/outside") {
		if h.name == "gzip-bomb" {
			continue // too big for a seed; MaxBytes is fuzzed through the other entries
		}
		l2 := []byte{}
		if len(h.layers) > 1 {
			l2 = h.layers[1]
		}
		seeds = append(seeds, [2][]byte{h.layers[0], l2})
	}
	return seeds
}

// FuzzFlatten replays two arbitrary layers and checks that nothing is ever
// written outside staging, and that a successful Flatten leaves staging and
// Metadata in agreement (the Metadata contract).
func FuzzFlatten(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, layer1, layer2 []byte) {
		base := t.TempDir()
		staging, outside := filepath.Join(base, "staging"), filepath.Join(base, "outside")
		os.Mkdir(staging, 0o700)
		os.Mkdir(outside, 0o700)
		md, err := Flatten(context.Background(), memSource{layer1, layer2}, staging, FlattenOptions{MaxBytes: 1 << 20, MaxEntries: 1000})
		if ents, _ := os.ReadDir(outside); len(ents) != 0 {
			t.Fatalf("Flatten wrote outside staging: %v", ents)
		}
		if ents, _ := os.ReadDir(base); len(ents) != 2 {
			t.Fatalf("Flatten wrote beside staging: %v", ents)
		}
		if err != nil {
			return
		}
		checkMirror(t, md, staging)
		for rel := range md {
			if err := CheckName(rel); err != nil {
				t.Errorf("Metadata holds a name CheckName refuses: %v", err)
			}
		}
		compareBuilders(t, memSource{layer1, layer2}, staging, md)
	})
}

// compareBuilders builds the image src both ways — the staging builder
// from the tree Flatten left in staging, and the direct builder from the
// layers — and requires both to be clean by e2fsck -fn and identical path
// by path (loop-mounted read-only and walked: type, mode, owner, size,
// content, link target, device, xattrs, link counts, hardlink groups).
//
// It returns the direct image's walked tree, or nil when it could not be
// built here.
func compareBuilders(t *testing.T, src LayerSource, staging string, md Metadata) map[string]fileRecord {
	if _, err := exec.LookPath("resize2fs"); err != nil || os.Geteuid() != 0 {
		return nil // the ext4 half needs root (loop mounts) and e2fsprogs
	}
	dir := t.TempDir()
	size := DefaultSize(DiskUsage(md))
	stagingImg := filepath.Join(dir, "staging.ext4")
	if err := BuildExt4(context.Background(), staging, stagingImg, size); err != nil {
		t.Fatalf("BuildExt4: %v", err)
	}
	if err := ApplyOwnership(context.Background(), stagingImg, md); err != nil {
		t.Fatalf("ApplyOwnership: %v", err)
	}
	tree, err := Scan(context.Background(), src, dir, FlattenOptions{MaxBytes: 1 << 20, MaxEntries: 1000})
	if err != nil {
		t.Fatalf("Flatten accepted the image, Scan refused it: %v", err)
	}
	if diff := cmp.Diff(md, tree.Metadata(), cmpopts.EquateEmpty()); diff != "" {
		t.Fatalf("Scan's Metadata differs from Flatten's (-flatten +scan):\n%s", diff)
	}
	directImg := filepath.Join(dir, "direct.ext4")
	if err := tree.WriteExt4(context.Background(), src, directImg, size); err != nil {
		if errors.Is(err, ErrDirectUnsupported) {
			t.Logf("direct builder cannot build this one (the pull falls back to staging): %v", err)
			return nil
		}
		t.Fatalf("WriteExt4: %v", err)
	}
	trees := map[string]map[string]fileRecord{}
	for name, img := range map[string]string{"staging": stagingImg, "direct": directImg} {
		if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
			t.Fatalf("e2fsck -fn of the %s image: %v\n%s", name, err, out)
		}
		mnt := filepath.Join(dir, name+"-mnt")
		if err := os.Mkdir(mnt, 0o700); err != nil {
			t.Fatal(err)
		}
		run(t, "mount", "-o", "loop,ro", img, mnt)
		trees[name] = walkTree(t, mnt)
		run(t, "umount", mnt)
	}
	if diff := cmp.Diff(trees["staging"], trees["direct"]); diff != "" {
		t.Errorf("direct image differs from the staging image (-staging +direct):\n%s", diff)
	}
	t.Logf("staging and direct images agree on %d paths", len(trees["direct"]))
	return trees["direct"]
}

func TestWriteFuzzCorpus(t *testing.T) {
	testutil.OptIn(t, "BANGER_WRITE_FUZZ_CORPUS", "regenerating testdata/fuzz/FuzzFlatten")
	dir := filepath.Join("testdata", "fuzz", "FuzzFlatten")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, s := range fuzzSeeds(t) {
		content := "go test fuzz v1\n[]byte(" + strconv.Quote(string(s[0])) + ")\n[]byte(" + strconv.Quote(string(s[1])) + ")\n"
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(content), 0o644); err != nil { //nolint:gosec // test data
			t.Fatal(err)
		}
	}
}
