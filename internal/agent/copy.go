package agent

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrUnsafeEntry is returned for a tar entry that would land outside the
// destination, pass through a symlink, or is of a kind that cannot be
// created.
var ErrUnsafeEntry = errors.New("unsafe tar entry")

// WriteTar writes src as a tar stream: a file, a symlink (not followed) or
// a tree, under the top-level name base(src). A src ending in "/." writes
// the tree's contents under ".". Modes, owners, mtimes, symlinks and hard
// links are kept.
func WriteTar(w io.Writer, src string) error {
	tw := tar.NewWriter(w)
	root, top := filepath.Dir(src), filepath.Base(src)
	if strings.HasSuffix(src, "/.") || src == "." {
		root, top = strings.TrimSuffix(src, "."), "."
	}
	links := map[[2]uint64]string{}
	start := filepath.Join(root, top)
	err := filepath.WalkDir(start, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(start, p)
		if err != nil {
			return err
		}
		name := path.Join(top, filepath.ToSlash(rel))
		if top == "." && rel != "." {
			name = "./" + filepath.ToSlash(rel)
		}
		target := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if target, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, target)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		hdr.Name = name
		hdr.Uname, hdr.Gname = "", ""
		if fi.IsDir() && !strings.HasSuffix(hdr.Name, "/") {
			hdr.Name += "/"
		}
		hdr.Format = tar.FormatPAX
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && fi.Mode().IsRegular() && st.Nlink > 1 {
			key := [2]uint64{st.Dev, st.Ino}
			if first, ok := links[key]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				links[key] = name
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		f, err := os.Open(p) //nolint:gosec // the caller's own path
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := io.Copy(tw, f); err != nil {
			return fmt.Errorf("read %s: %w", p, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// CopyTarget says where a tar stream for dst goes, in the manner of docker
// cp: into dst when it is an existing directory; else dst is created in
// its parent, the stream's top-level name renamed to base(dst).
func CopyTarget(dst string) (dir, rename string, err error) {
	fi, err := os.Stat(dst)
	switch {
	case err == nil && fi.IsDir():
		return dst, "", nil
	case err == nil:
		return filepath.Dir(dst), filepath.Base(dst), nil
	case !errors.Is(err, fs.ErrNotExist):
		return "", "", err
	case strings.HasSuffix(dst, "/"):
		return "", "", fmt.Errorf("directory %s does not exist", dst)
	}
	parent := filepath.Dir(dst)
	pfi, err := os.Stat(parent)
	if err != nil {
		return "", "", fmt.Errorf("parent directory %s: %w", parent, err)
	}
	if !pfi.IsDir() {
		return "", "", fmt.Errorf("%s is not a directory", parent)
	}
	return parent, filepath.Base(dst), nil
}

// ExtractOptions tune ExtractTar.
type ExtractOptions struct {
	// Rename replaces the first path component of every entry.
	Rename string
	// KeepOwner applies the owners recorded in the stream (root only).
	KeepOwner bool
	// UID and GID own every entry when not KeepOwner; -1 leaves the owner
	// as the extracting process.
	UID, GID int
}

// ExtractTar unpacks a tar stream into dir. Entries are untrusted: an
// absolute name, a ".." component, a path through a symlink, or a hard
// link out of the stream is refused with ErrUnsafeEntry. Existing files
// are replaced; existing directories are kept. Directory mtimes are set
// last.
func ExtractTar(r io.Reader, dir string, opts ExtractOptions) error {
	tr := tar.NewReader(r)
	type dirTime struct {
		path  string
		mtime time.Time
	}
	var dirs []dirTime
	root := os.Geteuid() == 0
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read tar stream: %w", err)
		}
		rel, err := entryPath(hdr.Name, opts.Rename)
		if err != nil {
			return err
		}
		target, err := safeTarget(dir, rel)
		if err != nil {
			return err
		}
		mode := os.FileMode(hdr.Mode & 0o7777) //nolint:gosec // masked
		switch hdr.Typeflag {
		case tar.TypeDir:
			if fi, err := os.Lstat(target); err == nil && !fi.IsDir() {
				if err := os.Remove(target); err != nil {
					return err
				}
			}
			if err := os.Mkdir(target, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
			dirs = append(dirs, dirTime{target, hdr.ModTime})
		case tar.TypeReg:
			if err := replaceable(target); err != nil {
				return err
			}
			f, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600) //nolint:gosec // checked by safeTarget
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr) //nolint:gosec // a tar stream, not compressed: the entry is as large as the bytes sent
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("write %s: %w", target, err)
			}
		case tar.TypeSymlink:
			if err := replaceable(target); err != nil {
				return err
			}
			if err := os.Symlink(hdr.Linkname, target); err != nil {
				return err
			}
		case tar.TypeLink:
			lrel, err := entryPath(hdr.Linkname, opts.Rename)
			if err != nil {
				return err
			}
			old, err := safeTarget(dir, lrel)
			if err != nil {
				return err
			}
			if fi, err := os.Lstat(old); err != nil || !fi.Mode().IsRegular() {
				return fmt.Errorf("hard link %s to %s: not a regular file in the stream: %w", hdr.Name, hdr.Linkname, ErrUnsafeEntry)
			}
			if err := replaceable(target); err != nil {
				return err
			}
			if err := os.Link(old, target); err != nil {
				return err
			}
			continue
		case tar.TypeFifo, tar.TypeChar, tar.TypeBlock:
			if !root {
				return fmt.Errorf("%s is a device or fifo, which only root can create: %w", hdr.Name, ErrUnsafeEntry)
			}
			if err := replaceable(target); err != nil {
				return err
			}
			kind := map[byte]uint32{tar.TypeFifo: unix.S_IFIFO, tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK}[hdr.Typeflag]
			dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))           //nolint:gosec // device numbers
			if err := unix.Mknod(target, kind|uint32(mode), int(dev)); err != nil { //nolint:gosec // device numbers
				return fmt.Errorf("mknod %s: %w", target, err)
			}
		case tar.TypeXGlobalHeader:
			continue
		default:
			return fmt.Errorf("%s has tar type %q, which banger does not copy: %w", hdr.Name, hdr.Typeflag, ErrUnsafeEntry)
		}
		if err := applyMeta(target, hdr, mode, opts, root); err != nil {
			return err
		}
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Chtimes(dirs[i].path, dirs[i].mtime, dirs[i].mtime); err != nil {
			return err
		}
	}
	return nil
}

// entryPath cleans a tar name and applies the rename of its first
// component.
func entryPath(name, rename string) (string, error) {
	if name == "" || strings.ContainsRune(name, 0) || path.IsAbs(name) {
		return "", fmt.Errorf("tar entry %q: %w", truncate(name, 128), ErrUnsafeEntry)
	}
	for c := range strings.SplitSeq(name, "/") {
		if c == ".." {
			return "", fmt.Errorf("tar entry %q has a .. component: %w", truncate(name, 128), ErrUnsafeEntry)
		}
	}
	clean := path.Clean(name)
	if rename != "" {
		first, rest, _ := strings.Cut(clean, "/")
		_ = first
		clean = path.Join(rename, rest)
	}
	if clean == "." {
		return "", nil
	}
	return clean, nil
}

// safeTarget joins rel under dir, refusing a path whose parents are
// symlinks (or missing).
func safeTarget(dir, rel string) (string, error) {
	if rel == "" {
		return dir, nil
	}
	parts := strings.Split(rel, "/")
	cur := dir
	for _, p := range parts[:len(parts)-1] {
		cur = filepath.Join(cur, p)
		fi, err := os.Lstat(cur)
		if err != nil {
			return "", fmt.Errorf("tar entry %q: parent %s: %w", rel, cur, err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 || !fi.IsDir() {
			return "", fmt.Errorf("tar entry %q passes through %s, which is not a directory: %w", rel, cur, ErrUnsafeEntry)
		}
	}
	return filepath.Join(cur, parts[len(parts)-1]), nil
}

// replaceable removes whatever non-directory is at target.
func replaceable(target string) error {
	fi, err := os.Lstat(target)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("%s is a directory, the stream has a file there", target)
	}
	return os.Remove(target)
}

func applyMeta(target string, hdr *tar.Header, mode os.FileMode, opts ExtractOptions, root bool) error {
	if root {
		uid, gid := opts.UID, opts.GID
		if opts.KeepOwner {
			uid, gid = hdr.Uid, hdr.Gid
		}
		if uid >= 0 {
			if err := os.Lchown(target, uid, gid); err != nil {
				return fmt.Errorf("chown %s: %w", target, err)
			}
		}
	}
	if hdr.Typeflag == tar.TypeSymlink {
		ts := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, target, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("set mtime of %s: %w", target, err)
		}
		return nil
	}
	// Chmod after chown: chown clears the setuid and setgid bits.
	if err := os.Chmod(target, mode|modeTypeBits(hdr)); err != nil {
		return fmt.Errorf("chmod %s: %w", target, err)
	}
	if hdr.Typeflag != tar.TypeDir {
		if err := os.Chtimes(target, hdr.ModTime, hdr.ModTime); err != nil {
			return fmt.Errorf("set mtime of %s: %w", target, err)
		}
	}
	return nil
}

// modeTypeBits maps the tar setuid/setgid/sticky bits onto os.FileMode.
func modeTypeBits(hdr *tar.Header) os.FileMode {
	var m os.FileMode
	if hdr.Mode&0o4000 != 0 {
		m |= os.ModeSetuid
	}
	if hdr.Mode&0o2000 != 0 {
		m |= os.ModeSetgid
	}
	if hdr.Mode&0o1000 != 0 {
		m |= os.ModeSticky
	}
	return m
}

// guestPath resolves a copy path inside the guest: relative to the user's
// home unless absolute.
func guestPath(u *guestUser, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(u.home, p)
}

// serveCopyIn unpacks the host's tar stream at req.Path.
func (s *Server) serveCopyIn(_ context.Context, c net.Conn, req *CopyRequest) error {
	w := &msgWriter{w: c}
	pr, pw := io.Pipe()
	go func() {
		r := newMsgReader(c)
		for {
			t, payload, err := r.next()
			if err != nil {
				_ = pw.CloseWithError(fmt.Errorf("%w mid-copy: %v", ErrSessionLost, err)) //nolint:errorlint // the kind is ErrSessionLost
				return
			}
			switch t {
			case msgStdin:
				if _, err := pw.Write(payload); err != nil {
					return
				}
			case msgStdinEOF:
				_ = pw.Close()
				return
			}
		}
	}()
	err := s.copyIn(pr, req)
	_ = pr.CloseWithError(io.ErrClosedPipe)
	if err != nil {
		s.logf("copy in to %s: %v", req.Path, err)
		return w.exit(ExitStatus{Code: 1, Message: err.Error()})
	}
	return w.exit(ExitStatus{})
}

func (s *Server) copyIn(r io.Reader, req *CopyRequest) error {
	u, err := lookupUser(req.User)
	if err != nil {
		return err
	}
	dst := guestPath(u, req.Path)
	dir, rename, err := CopyTarget(dst)
	if err != nil {
		return err
	}
	opts := ExtractOptions{Rename: rename, KeepOwner: req.KeepOwner, UID: int(u.uid), GID: int(u.gid)}
	if err := ExtractTar(r, dir, opts); err != nil {
		return err
	}
	// Read the stream to its end so the last tar blocks are consumed.
	_, _ = io.Copy(io.Discard, r)
	return nil
}

// serveCopyOut sends req.Path as a tar stream.
func (s *Server) serveCopyOut(_ context.Context, c net.Conn, req *CopyRequest) error {
	w := &msgWriter{w: c}
	go func() {
		// The host closing the stream means it stopped reading.
		_, _ = io.Copy(io.Discard, c)
		_ = c.SetWriteDeadline(time.Unix(1, 0))
	}()
	u, err := lookupUser(req.User)
	if err == nil {
		src := guestPath(u, req.Path)
		if _, err = os.Lstat(strings.TrimSuffix(src, "/.")); err == nil {
			err = WriteTar(typedWriter{w, msgStdout}, src)
		}
	}
	if err != nil {
		s.logf("copy out of %s: %v", req.Path, err)
		return w.exit(ExitStatus{Code: 1, Message: err.Error()})
	}
	return w.exit(ExitStatus{})
}

// CopyIn sends the tar stream src over c (a stream opened with OpCopyIn)
// and waits for the guest to unpack it. It closes c.
func CopyIn(ctx context.Context, c io.ReadWriteCloser, src io.Reader) error {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	w := &msgWriter{w: c}
	sendErr := make(chan error, 1)
	go func() {
		buf := make([]byte, maxMessage)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				if werr := w.send(msgStdin, buf[:n]); werr != nil {
					sendErr <- nil // the reply says why
					return
				}
			}
			if errors.Is(err, io.EOF) {
				sendErr <- w.send(msgStdinEOF, nil)
				return
			}
			if err != nil {
				sendErr <- err
				_ = c.Close()
				return
			}
		}
	}()
	st, err := readOutput(ctx, c, nil, nil)
	if err != nil {
		select {
		case serr := <-sendErr:
			if serr != nil {
				return fmt.Errorf("read the local tar stream: %w", serr)
			}
		default:
		}
		return err
	}
	if st.Code != 0 {
		return fmt.Errorf("guest: %s", st.Message)
	}
	return nil
}

// CopyOut receives a tar stream over c (a stream opened with OpCopyOut)
// into dst. It closes c.
func CopyOut(ctx context.Context, c io.ReadWriteCloser, dst io.Writer) error {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	st, err := readOutput(ctx, c, dst, nil)
	if err != nil {
		return err
	}
	if st.Code != 0 {
		return fmt.Errorf("guest: %s", st.Message)
	}
	return nil
}
