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

// decodeQuoted undoes EncodePath the way debugfs's ss_parse reads one
// quoted argument: "..." with "" standing for a quote. It reports false
// for anything ss_parse would not read back as exactly one argument.
func decodeQuoted(s string) (string, bool) {
	if len(s) < 2 || s[0] != '"' || s[len(s)-1] != '"' {
		return "", false
	}
	inner := s[1 : len(s)-1]
	var b strings.Builder
	for i := 0; i < len(inner); i++ {
		if inner[i] == '"' {
			if i+1 >= len(inner) || inner[i+1] != '"' {
				return "", false // a lone quote would end the argument early
			}
			i++
		}
		b.WriteByte(inner[i])
	}
	return b.String(), true
}

func TestCheckName(t *testing.T) {
	ok := []string{"", "etc/shadow", "a b", `q"uote`, "#x", "!x", "-x", "<12>", `back\slash`, "trail ", "\xff\xfe", strings.Repeat("n", 255), "é"}
	for _, n := range ok {
		if err := CheckName(n); err != nil {
			t.Errorf("CheckName(%q) = %v, want nil", n, err)
		}
	}
	bad := []string{"a\nb", "x\n!touch /tmp/pwned", "a\rb", "nul\x00", "tab\t", "del\x7f", "\x1b[31m", strings.Repeat("a", MaxNameBytes+1)}
	for _, n := range bad {
		err := CheckName(n)
		if !errors.Is(err, ErrHostileName) {
			t.Errorf("CheckName(%q) = %v, want ErrHostileName", n, err)
			continue
		}
		if n != bad[len(bad)-1] && !strings.Contains(err.Error(), strconv.Quote(n)) {
			t.Errorf("CheckName(%q) error %q does not quote the entry", n, err)
		}
	}
}

func TestEncodePath(t *testing.T) {
	cases := map[string]string{
		"/etc/shadow":    `"/etc/shadow"`,
		`/a"b`:           `"/a""b"`,
		`/""`:            `"/"""""`,
		"/-rf":           `"/-rf"`,
		"/<12>":          `"/<12>"`,
		"/#c !d":         `"/#c !d"`,
		`/back\slash\"x`: `"/back\slash\""x"`,
	}
	for in, want := range cases {
		got, err := EncodePath(in)
		if err != nil || got != want {
			t.Errorf("EncodePath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"rel/path", "", "<12>", "-f"} {
		if _, err := EncodePath(in); !errors.Is(err, ErrHostileName) {
			t.Errorf("EncodePath(%q) = %v, want ErrHostileName (not absolute)", in, err)
		}
	}
}

func TestScriptRefusesUnsafeWords(t *testing.T) {
	for _, tc := range []struct {
		name string
		add  func(*script)
	}{
		{"newline in path", func(s *script) { s.add("sif", qpath("/a\n!touch /x"), lit("uid"), lit("0")) }},
		{"bare word with space", func(s *script) { s.add("sif", qpath("/a"), lit("uid 0")) }},
		{"bare word with quote", func(s *script) { s.add("sif", qpath("/a"), lit(`"`)) }},
		{"bang command", func(s *script) { s.add("!sh") }},
		{"base with slash", func(s *script) { s.add("mknod", qbase("a/b"), lit("p")) }},
		{"base dotdot", func(s *script) { s.add("mknod", qbase(".."), lit("p")) }},
		{"relative path", func(s *script) { s.add("stat", qpath("etc")) }},
	} {
		var s script
		s.add("stat", qpath("/ok"))
		tc.add(&s)
		s.add("stat", qpath("/after"))
		if s.err == nil {
			t.Errorf("%s: script accepted it:\n%s", tc.name, s.buf.String())
		}
		if s.len() != 1 {
			t.Errorf("%s: %d lines after the error, want only the first", tc.name, s.len())
		}
	}
}

// TestScriptLineLimit checks the guard against debugfs's 8 KiB line buffer:
// the longest acceptable name, all quotes, still fits one line, and one
// byte more is refused before a line is written.
func TestScriptLineLimit(t *testing.T) {
	parts := make([]string, 0, MaxNameBytes/256+1)
	remaining := MaxNameBytes - 1
	for remaining > 0 {
		n := min(255, remaining)
		parts = append(parts, strings.Repeat(`"`, n))
		remaining -= n + 1
	}
	p := "/" + strings.Join(parts, "/")
	p = p[:min(len(p), MaxNameBytes)]
	var s script
	s.add("ea_set", lit("-f"), qpath("/tmp/banger-xattr-123456789/1234567-12"), qpath(p), lit("security.capability"))
	if s.err != nil {
		t.Fatalf("longest name (%d bytes): %v", len(p), s.err)
	}
	if l := len(s.lines[0]); l >= 8191 {
		t.Fatalf("line is %d bytes, debugfs would split it", l)
	}
	s = script{}
	s.add("stat", qpath(p+"x"))
	if !errors.Is(s.err, ErrHostileName) {
		t.Fatalf("name of %d bytes: err = %v, want ErrHostileName", len(p)+1, s.err)
	}
}

func TestStderrErrors(t *testing.T) {
	if bad := stderrErrors([]byte("debugfs 1.47.0 (5-Feb-2023)\n")); len(bad) != 0 {
		t.Errorf("banner only: %q", bad)
	}
	got := stderrErrors([]byte("debugfs 1.47.0 (5-Feb-2023)\n/x: File not found by ext2_lookup \ndebugfs 1.47.0 (5-Feb-2023)\n"))
	want := []string{"/x: File not found by ext2_lookup", "debugfs 1.47.0 (5-Feb-2023)"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("stderrErrors = %q, want %q (a second banner is unexpected)", got, want)
	}
	if bad := stderrErrors([]byte("something else\n")); len(bad) != 1 {
		t.Errorf("no banner: %q, want one error", bad)
	}
}

// FuzzEncodeName: any name is either refused by CheckName, or encodes to a
// single safe debugfs line from which ss_parse gets the name back.
func FuzzEncodeName(f *testing.F) {
	for _, seed := range []string{
		"etc/shadow", "a b", `q"uote`, `""`, "#c", "!touch x", "-rf", "<12>", `b\s`, "trail ",
		"\xff\xfe", "x\n!touch /tmp/pwned", "\r", "\x00", "\x7f", strings.Repeat("a", 255), "é/ü",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, name string) {
		p := "/" + name
		if err := CheckName(p); err != nil {
			if !errors.Is(err, ErrHostileName) {
				t.Fatalf("CheckName(%q) = %v, not ErrHostileName", p, err)
			}
			if _, err := EncodePath(p); err == nil {
				t.Fatalf("EncodePath(%q) accepted a name CheckName refused", p)
			}
			return
		}
		enc, err := EncodePath(p)
		if err != nil {
			t.Fatalf("EncodePath(%q) = %v after CheckName passed", p, err)
		}
		if !strings.HasPrefix(enc, `"`) || strings.ContainsAny(enc, "\r\n\x00") {
			t.Fatalf("EncodePath(%q) = %q: not one quoted line", p, enc)
		}
		got, ok := decodeQuoted(enc)
		if !ok || got != p {
			t.Fatalf("decode(EncodePath(%q)) = %q, %v", p, got, ok)
		}
		var s script
		s.add("set_inode_field", qpath(p), lit("uid"), lit("0"))
		if s.err != nil {
			t.Fatalf("script line for %q: %v", p, s.err)
		}
		if line := s.buf.String(); strings.Count(line, "\n") != 1 || !strings.HasPrefix(line, "set_inode_field \"") || len(line) > 8190 {
			t.Fatalf("script for %q is not one safe line: %q", p, line)
		}
	})
}

// requireE2fsprogs skips unless the e2fsprogs tools the real-ext4 tests use
// are installed.
func requireE2fsprogs(t *testing.T) {
	t.Helper()
	testutil.RequiresTool(t, "mkfs.ext4", "debugfs", "e2fsck")
}

// mkfsStaging makes an ext4 image from dir with plain mkfs.ext4 -d.
func mkfsStaging(t *testing.T, dir string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "fs.ext4")
	if err := BuildExt4(context.Background(), dir, img, 256<<20); err != nil {
		t.Fatalf("BuildExt4: %v", err)
	}
	return img
}

// inodeInfo is what the tests read back from debugfs stat.
type inodeInfo struct {
	Type     string
	Mode     uint32 // permission bits with setuid/setgid/sticky
	UID, GID int
	Major    int
	Minor    int
	Target   string // fast symlink target
}

var (
	statUserRE = regexp.MustCompile(`User: +(-?[0-9]+) +Group: +(-?[0-9]+)`)
	statDevRE  = regexp.MustCompile(`Device major/minor number: ([0-9]+):([0-9]+)`)
	statLinkRE = regexp.MustCompile(`^Fast link dest: "(.*)"$`)
	statModeRE = regexp.MustCompile(`Mode: +([0-7]+)`)
)

// statPaths reads the inodes of absolute paths with one debugfs run; a
// missing path has Type "".
func statPaths(t *testing.T, img string, paths ...string) map[string]inodeInfo {
	t.Helper()
	var s script
	for _, p := range paths {
		s.add("stat", qpath(p))
	}
	if s.err != nil {
		t.Fatal(s.err)
	}
	stdout, _, err := runDebugfsRaw(context.Background(), img, &s)
	if err != nil {
		t.Fatal(err)
	}
	blocks := splitEcho(stdout)
	if len(blocks) != len(paths) {
		t.Fatalf("stat: %d blocks for %d paths:\n%s", len(blocks), len(paths), stdout)
	}
	out := map[string]inodeInfo{}
	for i, b := range blocks {
		var info inodeInfo
		if len(b.body) > 0 {
			m := statTypeRE.FindStringSubmatch(b.body[0])
			if m == nil {
				t.Fatalf("stat %q: %q", paths[i], b.body[0])
			}
			info.Type = m[1]
			mode, _ := strconv.ParseUint(statModeRE.FindStringSubmatch(b.body[0])[1], 8, 32)
			info.Mode = uint32(mode)
			for _, l := range b.body {
				if m := statUserRE.FindStringSubmatch(l); m != nil {
					// debugfs prints ids as signed 32-bit numbers.
					info.UID, info.GID = unsigned32(m[1]), unsigned32(m[2])
				}
				if m := statDevRE.FindStringSubmatch(l); m != nil {
					maj, _ := strconv.ParseInt(m[1], 16, 32)
					mnr, _ := strconv.ParseInt(m[2], 16, 32)
					info.Major, info.Minor = int(maj), int(mnr)
				}
				if m := statLinkRE.FindStringSubmatch(l); m != nil {
					info.Target = m[1]
				}
			}
		}
		out[paths[i]] = info
	}
	return out
}

func unsigned32(s string) int {
	n, _ := strconv.ParseInt(s, 10, 64)
	return int(uint32(n)) // #nosec G115 -- wraps a signed 32-bit id on purpose
}

// e2fsckClean fails the test unless e2fsck -fn finds nothing to fix.
func e2fsckClean(t *testing.T, img string) {
	t.Helper()
	out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img, err, out)
	}
}

// oddNames are the legitimate names that must round-trip through debugfs.
func oddNames() []string {
	long := strings.Repeat("L", 250) + "-255b"
	return []string{
		"with space", `quo"te`, `""`, "#hash", "!bang", "-leading", "--", "<12>", `back\slash`,
		"trailing ", " leading", "'single'", "a;b|c&d$(e)`f`", "*?[x]", "%s%n", long,
		"\xff\xfe\xfd", "caf\xc3\xa9", "日本語",
	}
}

// TestOddNamesRoundTrip is the experiment the encoder rests on: every
// legitimate odd name, as a file, a directory and inside a directory with
// an odd name, gets exactly the owner and mode ApplyOwnership was asked for.
func TestOddNamesRoundTrip(t *testing.T) {
	requireE2fsprogs(t)
	staging := t.TempDir()
	md := Metadata{"": {Type: TypeDir, Mode: 0o755}}
	want := map[string]inodeInfo{}
	for i, n := range oddNames() {
		if len(n) > 255 {
			t.Fatalf("bad test name %q", n)
		}
		dir := "d" + strconv.Itoa(i) + n
		if len(dir) > 255 {
			dir = dir[:255]
		}
		for j, rel := range []string{n, dir, dir + "/" + n} {
			full := filepath.Join(staging, rel)
			var err error
			typ := TypeRegular
			if j == 1 {
				typ = TypeDir
				err = os.Mkdir(full, 0o700)
			} else {
				err = os.WriteFile(full, []byte(rel), 0o600)
			}
			if err != nil {
				t.Fatalf("stage %q: %v", rel, err)
			}
			id := 1000 + 10*i + j
			mode := os.FileMode(0o640 | (i % 7))
			md[rel] = FileMeta{Type: typ, UID: id, GID: id + 100000, Mode: mode}
			kind := "regular"
			if typ == TypeDir {
				kind = "directory"
			}
			want["/"+rel] = inodeInfo{Type: kind, Mode: uint32(mode), UID: id, GID: id + 100000}
		}
	}
	img := mkfsStaging(t, staging)
	if err := ApplyOwnership(context.Background(), img, md); err != nil {
		t.Fatalf("ApplyOwnership: %v", err)
	}
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
	e2fsckClean(t, img)
}
