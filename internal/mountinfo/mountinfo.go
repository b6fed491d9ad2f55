// Package mountinfo reads the kernel's mount table (/proc/self/mountinfo):
// the one parser that banger's PID 1, the guest's FUSE read-ahead, the
// jailer's cgroup cleanup and the test sweep share.
package mountinfo

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"
)

// Mount is one line of /proc/self/mountinfo.
type Mount struct {
	// Device is the mount's MAJOR:MINOR, as the kernel writes it.
	Device string
	// Point is the mount point, unescaped.
	Point string
	// FSType is the file system type (after the " - " separator).
	FSType string
}

// Read parses /proc/self/mountinfo. The mounts come in mount order.
func Read() ([]Mount, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	return Parse(b), nil
}

// Parse parses the text of a mountinfo file, skipping malformed lines.
func Parse(mountinfo []byte) []Mount {
	var out []Mount
	sc := bufio.NewScanner(bytes.NewReader(mountinfo))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent MAJOR:MINOR root point options [optional...] - fstype source super-options
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			continue
		}
		m := Mount{Device: f[2], Point: Unescape(f[4])}
		for i := 5; i+1 < len(f); i++ {
			if f[i] == "-" {
				m.FSType = f[i+1]
				break
			}
		}
		out = append(out, m)
	}
	return out
}

// Points lists the mount points of mounts, in order.
func Points(mounts []Mount) []string {
	out := make([]string, 0, len(mounts))
	for _, m := range mounts {
		out = append(out, m.Point)
	}
	return out
}

// Unescape undoes the kernel's octal escapes (\040 for a space, \011,
// \012, \134) in a path of /proc/self/mountinfo or /proc/self/mounts.
// A backslash not followed by three octal digits is kept as it is.
func Unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
