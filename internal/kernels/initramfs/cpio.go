package initramfs

import (
	"fmt"
	"io"
	"strings"
)

// File mode type bits as cpio (and Linux) encode them.
const (
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeChr  = 0o020000
	modeLink = 0o120000
)

// Writer writes a "newc" (SVR4, no checksum) cpio archive, the format the
// kernel unpacks into its initramfs. Entries carry uid/gid 0 and mtime 0,
// so the same input gives the same bytes. Parents must be written before
// their children.
type Writer struct {
	w   io.Writer
	ino uint32
	n   int64
	err error
}

// NewWriter returns a Writer writing to w. Close writes the trailer.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w, ino: 1} }

// Dir adds a directory.
func (cw *Writer) Dir(name string, perm uint32) error {
	return cw.entry(name, modeDir|perm&0o7777, 0, 0, nil)
}

// File adds a regular file with the given content.
func (cw *Writer) File(name string, perm uint32, data []byte) error {
	return cw.entry(name, modeReg|perm&0o7777, 0, 0, data)
}

// Symlink adds a symbolic link.
func (cw *Writer) Symlink(name, target string) error {
	return cw.entry(name, modeLink|0o777, 0, 0, []byte(target))
}

// CharDev adds a character device node.
func (cw *Writer) CharDev(name string, perm, major, minor uint32) error {
	return cw.entry(name, modeChr|perm&0o7777, major, minor, nil)
}

// Close writes the TRAILER!!! entry. It does not close the underlying writer.
func (cw *Writer) Close() error {
	return cw.entry("TRAILER!!!", 0, 0, 0, nil)
}

// Size is the number of bytes written so far.
func (cw *Writer) Size() int64 { return cw.n }

func (cw *Writer) entry(name string, mode, rmajor, rminor uint32, data []byte) error {
	if cw.err != nil {
		return cw.err
	}
	name = strings.TrimPrefix(name, "/")
	if name == "" || strings.IndexByte(name, 0) >= 0 {
		return fmt.Errorf("cpio: bad entry name %q", name)
	}
	ino := cw.ino
	if name == "TRAILER!!!" {
		ino = 0
	}
	cw.ino++
	nlink := 1
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+8+len(data)+4)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	buf = append(buf, data...)
	buf = pad4(buf)
	n, err := cw.w.Write(buf)
	cw.n += int64(n)
	if err != nil {
		cw.err = fmt.Errorf("cpio: write %s: %w", name, err)
	}
	return cw.err
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}
