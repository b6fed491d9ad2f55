package imagepull

// debugfs scripting.
//
// banger edits ext4 images without mounting them by feeding debugfs a script
// on standard input (debugfs -f -). debugfs runs as root and its command
// language was never meant to carry untrusted names, so every name goes
// through the encoder here. What debugfs 1.47 does with a script line, and
// therefore what the encoder must prevent:
//
//   - a line that begins with '!' is passed to system(3), as root;
//   - a line that begins with '#' is a comment;
//   - a line is cut at the first '\r' (and at '\n', naturally);
//   - lines are read with fgets into an 8192-byte buffer: a longer line is
//     split, and its tail runs as a line of its own (which can begin with
//     '!'); names are therefore length-limited;
//   - inside "...", a doubled "" is a literal quote; there is no escape for
//     a newline and no other escape at all (a backslash is literal);
//   - a whole argument of the form <123> means inode 123;
//   - getopt-style commands (ea_set, ea_get, ls ...) read any argument that
//     begins with '-' as an option, wherever it is (GNU getopt permutes);
//   - debugfs exits 0 when commands fail; the failure is only on stderr.
//
// So: names with control bytes are refused (CheckName), every path is
// absolute and always written quoted ("/..." can be neither an option nor
// an inode reference), every script line is checked to be a single line
// that begins with a command name and fits the buffer, and any stderr
// output other than the version banner fails the run.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
)

// ErrHostileName is returned for a name that banger cannot pass to debugfs
// safely: it contains a control byte (below 0x20, or 0x7f) or is too long.
var ErrHostileName = errors.New("name cannot be encoded safely for debugfs")

// ErrDebugfs is returned when debugfs reports an error for any command of a
// script, even though it exits 0.
var ErrDebugfs = errors.New("debugfs reported an error")

// MaxNameBytes is the longest path CheckName accepts. debugfs reads script
// lines into an 8192-byte buffer; a path of MaxNameBytes made entirely of
// quotes doubles to 6144 bytes, which leaves room for the command and its
// other arguments. Real images stay far below (Debian's deepest path is
// about 200 bytes).
const MaxNameBytes = 3072

// maxScriptLine is the longest script line the writer emits. debugfs's
// buffer is BUFSIZ (8192) including the newline and the terminating NUL.
const maxScriptLine = 8000

// CheckName reports whether name (a path from an image, or any other string
// that banger will hand to debugfs) can be encoded safely. It rejects any
// byte below 0x20 or equal to 0x7f, and names longer than MaxNameBytes, with
// an error that wraps ErrHostileName and quotes the name.
func CheckName(name string) error {
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < 0x20 || c == 0x7f {
			return fmt.Errorf("entry %q: byte 0x%02x at offset %d: %w", name, c, i, ErrHostileName)
		}
	}
	if len(name) > MaxNameBytes {
		return fmt.Errorf("entry %q: %d bytes, more than %d: %w", name, len(name), MaxNameBytes, ErrHostileName)
	}
	return nil
}

// quoteWord encodes s as one quoted debugfs argument: "s" with every quote
// doubled. It refuses names CheckName rejects.
func quoteWord(s string) (string, error) {
	if err := CheckName(s); err != nil {
		return "", err
	}
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`, nil
}

// EncodePath encodes an absolute path inside the file system (it must begin
// with '/') as a quoted debugfs argument. Because the argument begins with
// '/', debugfs can read it neither as an option nor as an <inode> reference.
func EncodePath(p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("entry %q: debugfs paths must be absolute: %w", p, ErrHostileName)
	}
	return quoteWord(p)
}

// encodeWord encodes a quoted argument: an absolute path, or for a base
// word a single non-empty name without '/' that is not "." or "..".
func encodeWord(w word) (string, error) {
	if !w.base {
		return EncodePath(w.text)
	}
	if w.text == "" || w.text == "." || w.text == ".." || strings.Contains(w.text, "/") {
		return "", fmt.Errorf("entry %q: not a single file name: %w", w.text, ErrHostileName)
	}
	return quoteWord(w.text)
}

// imagePath turns a Metadata key ("" for the root, "a/b" otherwise) into the
// absolute path debugfs resolves from the file system root.
func imagePath(rel string) string {
	return "/" + strings.TrimPrefix(rel, "/")
}

// word is one argument of a script line.
type word struct {
	text   string
	quoted bool
	base   bool // a single name in the current directory, not a path
}

// lit is an argument written bare: a command option or number, from banger
// itself, never from an image.
func lit(s string) word { return word{text: s} }

// qpath is an absolute path, always quoted.
func qpath(p string) word { return word{text: p, quoted: true} }

var (
	bareWordRE = regexp.MustCompile(`^[A-Za-z0-9_.:=+-]+$`)
	commandRE  = regexp.MustCompile(`^[a-z_2]+$`)
)

// script builds a debugfs command file. The first error sticks; later
// additions are ignored and err reports it.
type script struct {
	buf   bytes.Buffer
	lines []string
	err   error
}

// add appends the command cmd with its arguments as one line.
func (s *script) add(cmd string, args ...word) {
	if s.err != nil {
		return
	}
	if !commandRE.MatchString(cmd) {
		s.err = fmt.Errorf("debugfs command %q: not a command name", cmd)
		return
	}
	var line strings.Builder
	line.WriteString(cmd)
	for _, a := range args {
		line.WriteByte(' ')
		if a.quoted {
			enc, err := encodeWord(a)
			if err != nil {
				s.err = err
				return
			}
			line.WriteString(enc)
			continue
		}
		if !bareWordRE.MatchString(a.text) {
			s.err = fmt.Errorf("debugfs argument %q: not a safe bare word", a.text)
			return
		}
		line.WriteString(a.text)
	}
	l := line.String()
	if len(l) > maxScriptLine {
		s.err = fmt.Errorf("debugfs line for %q: %d bytes, more than %d: %w", cmd, len(l), maxScriptLine, ErrHostileName)
		return
	}
	s.lines = append(s.lines, l)
	s.buf.WriteString(l)
	s.buf.WriteByte('\n')
}

// len is the number of commands in the script.
func (s *script) len() int { return len(s.lines) }

// bannerRE matches the version line debugfs always prints on stderr first,
// e.g. "debugfs 1.47.0 (5-Feb-2023)".
var bannerRE = regexp.MustCompile(`^debugfs [0-9]+\.[0-9]+(\.[0-9]+)?(-[A-Za-z0-9.]+)? \([^)]*\)$`)

// maxStderr caps how much of debugfs's stderr is kept for an error message.
const maxStderr = 16 << 10

// runDebugfs runs the script against the ext4 image at ext4Path (read-write
// when write is set) and returns debugfs's standard output. Any standard
// error output other than the version banner is a failure wrapping
// ErrDebugfs that quotes the first error lines.
func runDebugfs(ctx context.Context, ext4Path string, s *script, write bool) ([]byte, error) {
	if s.err != nil {
		return nil, s.err
	}
	if !strings.HasPrefix(ext4Path, "/") {
		return nil, fmt.Errorf("debugfs image path %q must be absolute", ext4Path)
	}
	args := []string{"-f", "-"}
	if write {
		args = append([]string{"-w"}, args...)
	}
	args = append(args, ext4Path)
	cmd := exec.CommandContext(ctx, "debugfs", args...) // #nosec G204 -- fixed program, absolute path argument
	cmd.Env = debugfsEnv()
	cmd.Stdin = bytes.NewReader(s.buf.Bytes())
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	runErr := cmd.Run()
	if ctxErr := ctx.Err(); ctxErr != nil {
		return nil, fmt.Errorf("debugfs on %q: %w", ext4Path, ctxErr)
	}
	if bad := stderrErrors(stderr.Bytes()); len(bad) > 0 {
		return nil, fmt.Errorf("debugfs on %q (%d commands): %d error lines, first: %s: %w",
			ext4Path, s.len(), len(bad), strings.Join(firstN(bad, 5), "; "), ErrDebugfs)
	}
	if runErr != nil {
		return nil, fmt.Errorf("debugfs on %q: %w", ext4Path, runErr)
	}
	return stdout.Bytes(), nil
}

// debugfsEnv is a minimal, predictable environment: no pager, C messages.
func debugfsEnv() []string {
	env := []string{"DEBUGFS_PAGER=__none__", "PAGER=__none__", "LC_ALL=C"}
	if p := os.Getenv("PATH"); p != "" {
		env = append(env, "PATH="+p)
	}
	return env
}

// stderrErrors returns every stderr line that is not the version banner.
// debugfs writes command echoes and results to stdout and every diagnostic
// to stderr, so on success stderr holds only the banner.
func stderrErrors(stderr []byte) []string {
	if len(stderr) > maxStderr {
		stderr = append(stderr[:maxStderr:maxStderr], []byte("\n[stderr truncated]")...)
	}
	var bad []string
	sc := bufio.NewScanner(bytes.NewReader(stderr))
	sc.Buffer(make([]byte, 0, 64<<10), maxStderr+64)
	first := true
	for sc.Scan() {
		line := sc.Text()
		if first && bannerRE.MatchString(line) {
			first = false
			continue
		}
		first = false
		if strings.TrimSpace(line) == "" {
			continue
		}
		bad = append(bad, strings.TrimSpace(line))
	}
	return bad
}

func firstN(s []string, n int) []string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// statKind is the file type debugfs's stat reports for a path, or "" when
// the path does not exist.
type statKind string

// The kinds probe reports.
const (
	kindMissing statKind = ""
	kindDir     statKind = "directory"
	kindRegular statKind = "regular"
	kindSymlink statKind = "symlink"
	kindChar    statKind = "character special"
	kindBlock   statKind = "block special"
	kindFIFO    statKind = "FIFO"
	kindSocket  statKind = "socket"
)

var statTypeRE = regexp.MustCompile(`^Inode: [0-9]+ +Type: (.+?) +Mode: `)

// probe reports the kind of each absolute path in the image, read-only, in
// one debugfs run. A missing path is kindMissing; any other error fails.
func probe(ctx context.Context, ext4Path string, paths []string) (map[string]statKind, error) {
	out := make(map[string]statKind, len(paths))
	if len(paths) == 0 {
		return out, nil
	}
	var s script
	for _, p := range paths {
		s.add("stat", qpath(p))
	}
	if s.err != nil {
		return nil, s.err
	}
	if s.len() != len(paths) {
		return nil, errors.New("probe: script length mismatch")
	}
	// stat of a missing path prints "<path>: File not found by ext2_lookup"
	// on stderr: run without the strict stderr check and check it here.
	stdout, stderr, err := runDebugfsRaw(ctx, ext4Path, &s)
	if err != nil {
		return nil, err
	}
	missing := map[string]bool{}
	for _, l := range stderrErrors(stderr) {
		p, ok := strings.CutSuffix(l, ": File not found by ext2_lookup")
		if !ok {
			return nil, fmt.Errorf("debugfs probe on %q: %s: %w", ext4Path, l, ErrDebugfs)
		}
		missing[p] = true
	}
	// stdout is a sequence of blocks, each starting with the echo of its
	// command. The echoes must match the script exactly, one for one, so a
	// symlink target or xattr printed in a block cannot fake a block.
	blocks := splitEcho(stdout)
	if len(blocks) != len(paths) {
		return nil, fmt.Errorf("debugfs probe on %q: %d command echoes for %d commands: %w", ext4Path, len(blocks), len(paths), ErrDebugfs)
	}
	for i, b := range blocks {
		if b.echo != s.lines[i] {
			return nil, fmt.Errorf("debugfs probe on %q: echo %q for command %q: %w", ext4Path, b.echo, s.lines[i], ErrDebugfs)
		}
		p := paths[i]
		if len(b.body) == 0 {
			if !missing[p] {
				return nil, fmt.Errorf("debugfs probe on %q: no output for %q: %w", ext4Path, p, ErrDebugfs)
			}
			out[p] = kindMissing
			continue
		}
		m := statTypeRE.FindStringSubmatch(b.body[0])
		if m == nil {
			return nil, fmt.Errorf("debugfs probe on %q: unexpected stat output %q for %q: %w", ext4Path, b.body[0], p, ErrDebugfs)
		}
		out[p] = statKind(m[1])
	}
	return out, nil
}

// runDebugfsRaw runs a read-only script and returns stdout and stderr
// without judging stderr.
func runDebugfsRaw(ctx context.Context, ext4Path string, s *script) (stdout, stderr []byte, err error) {
	if !strings.HasPrefix(ext4Path, "/") {
		return nil, nil, fmt.Errorf("debugfs image path %q must be absolute", ext4Path)
	}
	cmd := exec.CommandContext(ctx, "debugfs", "-f", "-", ext4Path) // #nosec G204 -- fixed program, absolute path argument
	cmd.Env = debugfsEnv()
	cmd.Stdin = bytes.NewReader(s.buf.Bytes())
	var o, e bytes.Buffer
	cmd.Stdout = &o
	cmd.Stderr = &e
	if err := cmd.Run(); err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, nil, fmt.Errorf("debugfs on %q: %w", ext4Path, ctxErr)
		}
		return nil, nil, fmt.Errorf("debugfs on %q: %w (stderr: %s)", ext4Path, err, strings.TrimSpace(e.String()))
	}
	return o.Bytes(), e.Bytes(), nil
}

type echoBlock struct {
	echo string   // the command as debugfs echoed it, without "debugfs: "
	body []string // the lines that followed, up to the next echo
}

// splitEcho cuts debugfs's stdout at its "debugfs: <command>" echo lines.
func splitEcho(stdout []byte) []echoBlock {
	var blocks []echoBlock
	for _, line := range strings.Split(string(stdout), "\n") {
		if cmd, ok := strings.CutPrefix(line, "debugfs: "); ok {
			blocks = append(blocks, echoBlock{echo: cmd})
			continue
		}
		if len(blocks) > 0 && line != "" {
			blocks[len(blocks)-1].body = append(blocks[len(blocks)-1].body, line)
		}
	}
	return blocks
}
