package kernels

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
)

// InstallModules copies the modules tree modulesDir (a kernel's
// lib/modules/<version>) into the ext4 image at ext4Path, as
// /lib/modules/<version> (under /usr/lib when /lib is the merged-/usr
// symlink), owned by root, so that the guest's modprobe and
// modules-load.d (vsock) find the modules of the kernel it boots. banger
// does this once, when an image is pulled with a kernel; an image whose
// kernel changes later gets the new tree the same way.
//
// The image is edited offline with `debugfs -w`; it must not be mounted.
// Names are checked (no control bytes) and always passed quoted, with '"'
// doubled, as debugfs 1.47 parses them. debugfs exits 0 when a command
// fails, so any diagnostic on its stderr fails the call (ErrDebugfs). An
// image that already has the version's directory gives ErrExists.
func InstallModules(ctx context.Context, ext4Path, modulesDir, version string) error {
	if err := checkVersion(version); err != nil {
		return err
	}
	abs, err := filepath.Abs(ext4Path)
	if err != nil {
		return err
	}
	libDir := "/lib"
	kinds, err := debugfsStat(ctx, abs, "/lib", "/usr/lib/modules", "/lib/modules")
	if err != nil {
		return fmt.Errorf("install modules into %s: %w", ext4Path, err)
	}
	if kinds["/lib"] == "symlink" {
		libDir = "/usr/lib"
	}
	base := path.Join(libDir, "modules")
	root := path.Join(base, version)
	probe, err := debugfsStat(ctx, abs, root)
	if err != nil {
		return fmt.Errorf("install modules into %s: %w", ext4Path, err)
	}
	if probe[root] != "" {
		return fmt.Errorf("install modules into %s: %s: %w", ext4Path, root, ErrExists)
	}

	var s debugfsScript
	if kinds["/lib"] == "" {
		s.add("mkdir", "/lib")
		s.own("/lib", 0o40755)
	}
	if libDir == "/usr/lib" && kinds["/usr/lib/modules"] == "" || libDir == "/lib" && kinds["/lib/modules"] == "" {
		s.add("mkdir", base)
		s.own(base, 0o40755)
	}
	s.add("mkdir", root)
	s.own(root, 0o40755)
	err = filepath.WalkDir(modulesDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == modulesDir {
			return err
		}
		rel, err := filepath.Rel(modulesDir, p)
		if err != nil {
			return err
		}
		target := path.Join(root, filepath.ToSlash(rel))
		switch {
		case d.IsDir():
			s.add("mkdir", target)
			s.own(target, 0o40755)
		case d.Type().IsRegular():
			s.add("cd", path.Dir(target))
			s.addBase("write", p, path.Base(target))
			s.own(target, 0o100644)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("install modules into %s: %w", ext4Path, err)
	}
	if _, err := runDebugfs(ctx, abs, &s, true); err != nil {
		return fmt.Errorf("install modules into %s: %w", ext4Path, err)
	}
	return nil
}

// ErrDebugfs is returned when debugfs reports an error (it exits 0 anyway).
var ErrDebugfs = errors.New("debugfs reported an error")

// maxDebugfsName keeps every script line far below debugfs's 8 KiB buffer.
const maxDebugfsName = 3072

// maxDebugfsLine is the longest script line written. debugfs reads lines
// into an 8192-byte buffer (newline and NUL included); a longer line would
// be split and its tail run as a command of its own.
const maxDebugfsLine = 8000

// maxDebugfsStderr caps the stderr kept from one run; a longer line is
// itself a failure, never a reason to skip the check.
const maxDebugfsStderr = 1 << 20

// debugfsScript is a debugfs command file; the first bad name sticks as err.
type debugfsScript struct {
	buf bytes.Buffer
	n   int
	err error
}

func quoteDebugfs(s string) (string, error) {
	if err := checkName(s); err != nil {
		return "", err
	}
	if len(s) > maxDebugfsName {
		return "", fmt.Errorf("name of %d bytes is too long for debugfs: %w", len(s), ErrUnsafeName)
	}
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`, nil
}

// add appends "cmd "path"..." where every argument is an absolute path.
func (s *debugfsScript) add(cmd string, paths ...string) {
	if s.err != nil {
		return
	}
	line := cmd
	for _, p := range paths {
		if !strings.HasPrefix(p, "/") {
			s.err = fmt.Errorf("debugfs path %q is not absolute", p)
			return
		}
		q, err := quoteDebugfs(p)
		if err != nil {
			s.err = err
			return
		}
		line += " " + q
	}
	s.line(line)
}

// line appends one finished line, refusing one debugfs would split.
func (s *debugfsScript) line(l string) {
	if len(l) > maxDebugfsLine {
		s.err = fmt.Errorf("debugfs line of %d bytes, more than %d: %w", len(l), maxDebugfsLine, ErrUnsafeName)
		return
	}
	s.buf.WriteString(l + "\n")
	s.n++
}

// addBase appends `cmd "hostPath" "name"` for a command creating name in
// the current directory (write): name must be one path component.
func (s *debugfsScript) addBase(cmd, hostPath, name string) {
	if s.err != nil {
		return
	}
	if name == "" || name == "." || name == ".." || strings.Contains(name, "/") || !strings.HasPrefix(hostPath, "/") {
		s.err = fmt.Errorf("debugfs %s: bad name %q or host path %q", cmd, name, hostPath)
		return
	}
	hq, err := quoteDebugfs(hostPath)
	if err != nil {
		s.err = err
		return
	}
	nq, err := quoteDebugfs(name)
	if err != nil {
		s.err = err
		return
	}
	s.line(cmd + " " + hq + " " + nq)
}

// own makes p root-owned with the given full mode (type bits included).
func (s *debugfsScript) own(p string, mode uint32) {
	if s.err != nil {
		return
	}
	q, err := quoteDebugfs(p)
	if err != nil {
		s.err = err
		return
	}
	fmt.Fprintf(&s.buf, "sif %s mode 0%o\nsif %s uid 0\nsif %s gid 0\n", q, mode, q, q)
	s.n += 3
}

var debugfsBanner = regexp.MustCompile(`^debugfs [0-9][^ ]* \(.*\)$`)

// runDebugfs feeds the script to debugfs and fails on any stderr output
// other than the version banner.
func runDebugfs(ctx context.Context, img string, s *debugfsScript, write bool) ([]byte, error) {
	if s.err != nil {
		return nil, s.err
	}
	args := []string{"-f", "-", img}
	if write {
		args = append([]string{"-w"}, args...)
	}
	cmd := exec.CommandContext(ctx, "debugfs", args...) // #nosec G204 -- fixed program; the script is quoted above
	cmd.Env = []string{"LC_ALL=C", "DEBUGFS_PAGER=__none__", "PAGER=__none__", "PATH=" + os.Getenv("PATH")}
	cmd.Stdin = bytes.NewReader(s.buf.Bytes())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	bad, err := stderrErrors(&stderr)
	if err != nil {
		return nil, fmt.Errorf("debugfs on %s: read its diagnostics: %w: %w", img, err, ErrDebugfs)
	}
	if len(bad) > 0 {
		if len(bad) > 3 {
			bad = bad[:3]
		}
		return nil, fmt.Errorf("debugfs on %s (%d commands): %s: %w", img, s.n, strings.Join(bad, "; "), ErrDebugfs)
	}
	if runErr != nil {
		return nil, fmt.Errorf("debugfs on %s: %w", img, runErr)
	}
	return stdout.Bytes(), nil
}

// stderrErrors returns debugfs's stderr lines other than the banner. A
// line the scanner cannot hold is an error, so a diagnostic is never lost.
func stderrErrors(r io.Reader) ([]string, error) {
	var bad []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxDebugfsStderr)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line != "" && !debugfsBanner.MatchString(line) {
			bad = append(bad, line)
		}
	}
	return bad, sc.Err()
}

var typeRE = regexp.MustCompile(`Type: (\w+)`)

// debugfsStat reports the type ("regular", "directory", "symlink", ...) of
// each path in the image, "" for a path that does not exist.
func debugfsStat(ctx context.Context, img string, paths ...string) (map[string]string, error) {
	out := map[string]string{}
	for _, p := range paths {
		q, err := quoteDebugfs(p)
		if err != nil {
			return nil, err
		}
		cmd := exec.CommandContext(ctx, "debugfs", "-R", "stat "+q, img) // #nosec G204 -- quoted, checked path
		cmd.Env = []string{"LC_ALL=C", "DEBUGFS_PAGER=__none__", "PAGER=__none__", "PATH=" + os.Getenv("PATH")}
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("debugfs stat %s in %s: %w: %s", p, img, err, strings.TrimSpace(stderr.String()))
		}
		if m := typeRE.FindSubmatch(stdout.Bytes()); m != nil {
			out[p] = string(m[1])
		} else if !strings.Contains(stderr.String(), "File not found") {
			return nil, fmt.Errorf("debugfs stat %s in %s: %s: %w", p, img, strings.TrimSpace(stderr.String()), ErrDebugfs)
		}
	}
	return out, nil
}
