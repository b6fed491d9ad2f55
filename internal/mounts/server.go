package mounts

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path"
	"sync"
	"syscall"

	"github.com/pkg/sftp"
	"golang.org/x/sys/unix"
)

// Serve answers SFTP requests on rwc for root until the peer closes it.
// Every request is carried out by root, beneath the folder. It closes rwc.
func Serve(rwc io.ReadWriteCloser, root *Root) error {
	h := &handlers{root: root, open: map[string]map[*openFile]struct{}{}}
	srv := sftp.NewRequestServer(rwc, sftp.Handlers{FileGet: h, FilePut: h, FileCmd: h, FileList: h}, sftp.WithRSMaxTxPacket(maxPacket))
	defer srv.Close()
	err := srv.Serve()
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// handlers maps pkg/sftp's request handlers onto a Root.
type handlers struct {
	root *Root

	// open is every file a guest handle has open, by the SFTP path it was
	// opened as (the path the request server gives a handle's Fsetstat),
	// so an fsync reaches the very descriptors the guest wrote through.
	mu   sync.Mutex
	open map[string]map[*openFile]struct{}
}

// FsyncExtension is the extended attribute a guest's fsync sends as an
// SFTP fsetstat on its handle: pkg/sftp's request server does not serve
// fsync@openssh.com, but hands a handle's fsetstat, extended attributes
// included, to the Setstat handler with the handle's path. Its data is
// "data" for fdatasync, anything else for fsync.
const FsyncExtension = "fsync@banger.dev"

// openFile is a host file a guest handle has open.
type openFile struct {
	*os.File
	h    *handlers
	path string
}

// Close forgets f and closes it (the request server closes a handle's
// file when the guest closes the handle).
func (f *openFile) Close() error {
	f.h.mu.Lock()
	if set := f.h.open[f.path]; set != nil {
		delete(set, f)
		if len(set) == 0 {
			delete(f.h.open, f.path)
		}
	}
	f.h.mu.Unlock()
	return f.File.Close()
}

func (h *handlers) openFile(p string, flags int, perm uint32) (*openFile, error) {
	f, err := h.root.OpenFile(p, flags, perm)
	if err != nil {
		return nil, err
	}
	of := &openFile{File: f, h: h, path: p}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.open[p] == nil {
		h.open[p] = map[*openFile]struct{}{}
	}
	h.open[p][of] = struct{}{}
	return of, nil
}

// fsync forces to the host's disk what was written to p: through the
// descriptors guest handles have open under that path (one is enough for
// an inode's data, but a handle's file may have been renamed or replaced
// since, so each distinct inode is synced), or through a new descriptor
// when none is open.
func (h *handlers) fsync(p string, dataOnly bool) error {
	sync := func(f *os.File) error {
		if dataOnly {
			return unix.Fdatasync(int(f.Fd()))
		}
		return f.Sync()
	}
	h.mu.Lock()
	files := make([]*os.File, 0, len(h.open[p]))
	for of := range h.open[p] {
		files = append(files, of.File)
	}
	h.mu.Unlock()
	if len(files) == 0 {
		f, err := h.root.OpenFile(p, os.O_RDONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		files = append(files, f)
	}
	seen := map[uint64]bool{}
	for _, f := range files {
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err != nil {
			// Closed meanwhile by its handle: the others still count.
			continue
		}
		if seen[st.Ino] {
			continue
		}
		seen[st.Ino] = true
		if err := sync(f); err != nil {
			return h.root.fail("fsync", p, err)
		}
	}
	return nil
}

// newFileMode is the mode a file the guest creates gets before the guest
// side applies the mode it asked for (SFTP's open carries none).
const newFileMode = 0o644

func (h *handlers) Fileread(r *sftp.Request) (io.ReaderAt, error) {
	return h.openFile(r.Filepath, os.O_RDONLY, 0)
}

func (h *handlers) Filewrite(r *sftp.Request) (io.WriterAt, error) {
	return h.openFile(r.Filepath, openFlags(r.Pflags()), newFileMode)
}

func (h *handlers) OpenFile(r *sftp.Request) (sftp.WriterAtReaderAt, error) {
	return h.openFile(r.Filepath, openFlags(r.Pflags()), newFileMode)
}

// openFlags converts SFTP open flags to os.O_* flags. Append is left out on
// purpose: writes carry their own offsets (pwrite), which O_APPEND would
// override.
func openFlags(f sftp.FileOpenFlags) int {
	var flags int
	switch {
	case f.Read && f.Write:
		flags = os.O_RDWR
	case f.Write || f.Append:
		flags = os.O_WRONLY
	default:
		flags = os.O_RDONLY
	}
	if f.Creat {
		flags |= os.O_CREATE
	}
	if f.Trunc {
		flags |= os.O_TRUNC
	}
	if f.Excl {
		flags |= os.O_EXCL
	}
	return flags
}

func (h *handlers) Filecmd(r *sftp.Request) error {
	switch r.Method {
	case "Setstat":
		for _, e := range r.Attributes().Extended {
			if e.ExtType == FsyncExtension {
				return h.fsync(r.Filepath, e.ExtData == "data")
			}
		}
		return h.root.SetAttr(r.Filepath, attrsOf(r))
	case "Rename":
		return h.root.Rename(r.Filepath, r.Target, false)
	case "Rmdir":
		return h.root.Rmdir(r.Filepath)
	case "Mkdir":
		mode := uint32(0o755)
		if r.AttrFlags().Permissions {
			mode = r.Attributes().Mode & 0o7777
		}
		return h.root.Mkdir(r.Filepath, mode)
	case "Link":
		return h.root.Link(r.Filepath, r.Target)
	case "Symlink":
		// pkg/sftp: Filepath is the link's target text, Target the link.
		return h.root.Symlink(r.Filepath, r.Target)
	case "Remove":
		return h.root.Remove(r.Filepath)
	}
	return &Errno{Op: r.Method, Path: r.Filepath, Errno: syscall.ENOTSUP, Err: errors.New("unsupported")}
}

func (h *handlers) PosixRename(r *sftp.Request) error {
	return h.root.Rename(r.Filepath, r.Target, true)
}

func (h *handlers) StatVFS(r *sftp.Request) (*sftp.StatVFS, error) {
	st, err := h.root.StatFS()
	if err != nil {
		return nil, err
	}
	flag := uint64(0)
	if h.root.readOnly {
		flag |= 1 // SSH_FXE_STATVFS_ST_RDONLY
	}
	return &sftp.StatVFS{
		Bsize: uint64(st.Bsize), Frsize: uint64(st.Frsize), Blocks: st.Blocks, Bfree: st.Bfree,
		Bavail: st.Bavail, Files: st.Files, Ffree: st.Ffree, Favail: st.Ffree,
		Fsid: uint64(uint32(st.Fsid.Val[0])) | uint64(uint32(st.Fsid.Val[1]))<<32, Flag: flag, Namemax: uint64(st.Namelen),
	}, nil
}

func attrsOf(r *sftp.Request) Attrs {
	var a Attrs
	flags, st := r.AttrFlags(), r.Attributes()
	if flags.Size {
		size := int64(st.Size)
		a.Size = &size
	}
	if flags.Permissions {
		mode := st.Mode & 0o7777
		a.Mode = &mode
	}
	if flags.UidGid {
		uid, gid := st.UID, st.GID
		a.UID, a.GID = &uid, &gid
	}
	if flags.Acmodtime {
		at, mt := st.AccessTime(), st.ModTime()
		a.Atime, a.Mtime = &at, &mt
	}
	return a
}

func (h *handlers) Filelist(r *sftp.Request) (sftp.ListerAt, error) {
	switch r.Method {
	case "List":
		fis, err := h.root.ReadDir(r.Filepath)
		if err != nil {
			return nil, err
		}
		return listerAt(fis), nil
	case "Stat":
		fi, err := h.root.Stat(r.Filepath)
		if err != nil {
			return nil, err
		}
		return listerAt{fi}, nil
	}
	return nil, &Errno{Op: r.Method, Path: r.Filepath, Errno: syscall.ENOTSUP, Err: errors.New("unsupported")}
}

func (h *handlers) Lstat(r *sftp.Request) (sftp.ListerAt, error) {
	fi, err := h.root.Lstat(r.Filepath)
	if err != nil {
		return nil, err
	}
	return listerAt{fi}, nil
}

func (h *handlers) Readlink(p string) (string, error) { return h.root.Readlink(p) }

// RealPath cleans p without resolving symlinks (the guest resolves them).
func (h *handlers) RealPath(p string) (string, error) { return path.Clean("/" + p), nil }

type listerAt []fs.FileInfo

func (l listerAt) ListAt(out []fs.FileInfo, off int64) (int, error) {
	if off >= int64(len(l)) {
		return 0, io.EOF
	}
	n := copy(out, l[off:])
	if off+int64(n) >= int64(len(l)) {
		return n, io.EOF
	}
	return n, nil
}
