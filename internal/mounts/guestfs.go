package mounts

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/pkg/sftp"
)

// GuestOptions tune a guest mount; the zero value uses the defaults.
type GuestOptions struct {
	// ReadOnly mounts read-only in the guest too (the host server refuses
	// writes whatever the guest does).
	ReadOnly bool
	// CacheTimeout is how long the guest kernel trusts names and attributes
	// before asking the host again; zero means DefaultCacheTimeout. Changes
	// made on the host show in the guest after at most this long.
	CacheTimeout time.Duration
	// Name is shown as the mount's source in the guest's /proc/mounts.
	Name string
}

// DefaultCacheTimeout is the guest's name and attribute cache lifetime.
const DefaultCacheTimeout = time.Second

// GuestMount is a host folder mounted in the guest.
type GuestMount struct {
	server *fuse.Server
	client *sftp.Client
	dir    string
}

// MountGuest mounts at dir a FUSE file system whose every operation is an
// SFTP request on conn to the host's mount server. It returns once the
// mount is in place. It needs root (it calls mount(2) itself, so no
// fusermount is needed) and /dev/fuse.
func MountGuest(conn io.ReadWriteCloser, dir string, opts GuestOptions) (*GuestMount, error) {
	p, err := mountFUSE(dir, opts)
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	return p.attach(conn)
}

// pendingMount is a FUSE mount made but not yet served: the kernel queues
// requests until attach gives it its SFTP session.
type pendingMount struct {
	srv  *fuse.Server
	root *node
	dir  string
}

// mountFUSE calls mount(2) for dir; nothing is served yet.
func mountFUSE(dir string, opts GuestOptions) (*pendingMount, error) {
	timeout := opts.CacheTimeout
	if timeout <= 0 {
		timeout = DefaultCacheTimeout
	}
	negative := time.Duration(0)
	name := opts.Name
	if name == "" {
		name = "banger"
	}
	mo := fuse.MountOptions{
		FsName:            name,
		Name:              "banger",
		DirectMountStrict: true,
		AllowOther:        true, // every guest user sees the folder; the kernel checks modes
		MaxWrite:          1 << 20,
		MaxReadAhead:      readAheadKB << 10,
		DisableXAttrs:     true,
		Options:           []string{"default_permissions"},
	}
	if opts.ReadOnly {
		mo.Options = append(mo.Options, "ro")
	}
	root := &node{c: &guestClient{ro: opts.ReadOnly, ttl: timeout}}
	raw := fs.NewNodeFS(root, &fs.Options{
		MountOptions:    mo,
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &negative,
	})
	srv, err := fuse.NewServer(raw, dir, &mo)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	// A kernel without the sysfs entry keeps its default read-ahead: the
	// mount works, only slower.
	_ = setReadAhead("/", dir)
	return &pendingMount{srv: srv, root: root, dir: dir}, nil
}

// attach starts the SFTP session on conn and serves the mount. When the
// session cannot start, the mount is served by a session that fails every
// request with EIO just long enough to unmount it cleanly.
func (p *pendingMount) attach(conn io.ReadWriteCloser) (*GuestMount, error) {
	client, err := sftp.NewClientPipe(conn, conn, sftp.MaxPacketUnchecked(maxPacket),
		sftp.UseConcurrentReads(true), sftp.UseConcurrentWrites(true), sftp.MaxConcurrentRequestsPerFile(64))
	if err != nil {
		_ = conn.Close()
		err = fmt.Errorf("mount %s: sftp session with the host: %w", p.dir, err)
		if client, _ = deadClient(); client == nil {
			return nil, err
		}
	}
	p.root.c.sftp = client // before Serve: no request has been read yet
	go p.srv.Serve()
	if werr := p.srv.WaitMount(); werr != nil && err == nil {
		err = fmt.Errorf("mount %s: %w", p.dir, werr)
	}
	if err != nil {
		_ = p.srv.Unmount()
		_ = client.Close()
		return nil, err
	}
	return &GuestMount{server: p.srv, client: client, dir: p.dir}, nil
}

// deadClient is an SFTP client whose every request fails with EIO.
func deadClient() (*sftp.Client, error) {
	a, b := net.Pipe()
	h := deadHandlers{}
	go func() {
		_ = sftp.NewRequestServer(b, sftp.Handlers{FileGet: h, FilePut: h, FileCmd: h, FileList: h}).Serve()
	}()
	return sftp.NewClientPipe(a, a)
}

type deadHandlers struct{}

var errDead = &Errno{Op: "sftp", Errno: syscall.EIO, Err: errors.New("no session with the host")}

func (deadHandlers) Fileread(*sftp.Request) (io.ReaderAt, error)  { return nil, errDead }
func (deadHandlers) Filewrite(*sftp.Request) (io.WriterAt, error) { return nil, errDead }
func (deadHandlers) Filecmd(*sftp.Request) error                  { return errDead }
func (deadHandlers) Filelist(*sftp.Request) (sftp.ListerAt, error) {
	return nil, errDead
}

// Unmount unmounts the folder and ends the SFTP session.
func (g *GuestMount) Unmount() error {
	err := g.server.Unmount()
	_ = g.client.Close() // teardown: the session may already have ended
	return err
}

// Wait returns when the mount is gone (unmounted in the guest, or Unmount).
func (g *GuestMount) Wait() { g.server.Wait() }

// maxPacket is the SFTP data size per read or write request: one request
// per FUSE read (128 KiB), well inside the protocol's 256 KiB message cap.
// The host server allows the same (Serve).
const maxPacket = 128 << 10

type guestClient struct {
	sftp *sftp.Client
	ro   bool
	ttl  time.Duration
	// reads is the mount's read stream, once the host has opened one:
	// handles opened read-only read through it.
	reads atomic.Pointer[readsClient]

	// listings remembers each directory's last listing for ttl, so the
	// lookups that follow a readdir (ls -l, find, git status) need no round
	// trip each. Any change made through the mount drops its directory's.
	mu       sync.Mutex
	listings map[string]listing
}

type listing struct {
	at      time.Time
	entries map[string]os.FileInfo
}

func (c *guestClient) remember(dir string, fis []os.FileInfo) {
	m := make(map[string]os.FileInfo, len(fis))
	for _, fi := range fis {
		m[fi.Name()] = fi
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.listings == nil || len(c.listings) > 4096 {
		c.listings = map[string]listing{}
	}
	c.listings[dir] = listing{at: time.Now(), entries: m}
}

// cached returns the remembered entry name of dir, if fresh.
func (c *guestClient) cached(dir, name string) (os.FileInfo, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l, ok := c.listings[dir]
	if !ok || time.Since(l.at) > c.ttl {
		return nil, false
	}
	fi, ok := l.entries[name]
	return fi, ok
}

// forget drops the listings of the directories holding paths.
func (c *guestClient) forget(paths ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range paths {
		delete(c.listings, path.Dir(p))
		delete(c.listings, p)
	}
}

// node is one file or directory; it knows its path through the inode tree.
type node struct {
	fs.Inode
	c *guestClient

	mu     sync.Mutex
	latest version // the file's version in its latest attributes from the host
	cached version // the file's version when last opened, kept in the page cache
}

var (
	_ fs.NodeGetattrer  = (*node)(nil)
	_ fs.NodeSetattrer  = (*node)(nil)
	_ fs.NodeLookuper   = (*node)(nil)
	_ fs.NodeReaddirer  = (*node)(nil)
	_ fs.NodeOpener     = (*node)(nil)
	_ fs.NodeCreater    = (*node)(nil)
	_ fs.NodeMkdirer    = (*node)(nil)
	_ fs.NodeUnlinker   = (*node)(nil)
	_ fs.NodeRmdirer    = (*node)(nil)
	_ fs.NodeRenamer    = (*node)(nil)
	_ fs.NodeSymlinker  = (*node)(nil)
	_ fs.NodeReadlinker = (*node)(nil)
	_ fs.NodeLinker     = (*node)(nil)
	_ fs.NodeStatfser   = (*node)(nil)
)

func (n *node) path() string { return "/" + n.Path(nil) }

func (n *node) child(name string) string { return path.Join(n.path(), name) }

func fillAttr(fi os.FileInfo, out *fuse.Attr) {
	st, ok := fi.Sys().(*sftp.FileStat)
	if !ok {
		return
	}
	out.Mode = st.Mode
	out.Size = st.Size
	out.Uid, out.Gid = st.UID, st.GID
	out.Mtime, out.Atime, out.Ctime = uint64(st.Mtime), uint64(st.Atime), uint64(st.Mtime)
	out.Nlink = 1
	if fi.IsDir() {
		out.Nlink = 2
	}
	if x, ok := hostStatOf(st); ok {
		setTime := func(ns int64, sec *uint64, nsec *uint32) {
			*sec, *nsec = uint64(ns/1e9), uint32(ns%1e9)
		}
		setTime(x.mtime, &out.Mtime, &out.Mtimensec)
		setTime(x.ctime, &out.Ctime, &out.Ctimensec)
		setTime(x.atime, &out.Atime, &out.Atimensec)
		out.Nlink = x.nlink
	}
	out.Blksize = 4096
	out.Blocks = (st.Size + 511) / 512
}

// hostStat is what StatExtension carries.
type hostStat struct {
	ino                 uint64
	nlink               uint32
	mtime, ctime, atime int64 // ns since the epoch
}

func hostStatOf(st *sftp.FileStat) (hostStat, bool) {
	for _, e := range st.Extended {
		if e.ExtType != StatExtension {
			continue
		}
		var x hostStat
		if n, err := fmt.Sscanf(e.ExtData, "%d %d %d %d %d", &x.ino, &x.nlink, &x.mtime, &x.ctime, &x.atime); err != nil || n != 5 || x.mtime < 0 || x.ctime < 0 || x.atime < 0 {
			return hostStat{}, false
		}
		return x, true
	}
	return hostStat{}, false
}

// version is what says a file's content is unchanged on the host: the
// same inode, size, mtime and ctime (nanoseconds, from StatExtension).
type version struct {
	ino          uint64
	size         uint64
	mtime, ctime int64
}

func versionOf(fi os.FileInfo) (version, bool) {
	st, ok := fi.Sys().(*sftp.FileStat)
	if !ok {
		return version{}, false
	}
	x, ok := hostStatOf(st)
	if !ok {
		return version{}, false
	}
	return version{ino: x.ino, size: st.Size, mtime: x.mtime, ctime: x.ctime}, true
}

func (n *node) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	fi, err := n.c.sftp.Lstat(n.path())
	if err != nil {
		return toErrno(err)
	}
	fillAttr(fi, &out.Attr)
	n.seen(fi)
	return 0
}

// seen records the host version of the latest attributes of n.
func (n *node) seen(fi os.FileInfo) {
	v, _ := versionOf(fi)
	n.mu.Lock()
	n.latest = v
	n.mu.Unlock()
}

// newChild returns the inode for name, reusing the one the tree already
// has when it is of the same type, so inode numbers stay stable (git
// compares them).
func (n *node) newChild(ctx context.Context, name string, fi os.FileInfo, out *fuse.EntryOut) *fs.Inode {
	fillAttr(fi, &out.Attr)
	mode := out.Mode & syscall.S_IFMT
	if ch := n.GetChild(name); ch != nil && ch.StableAttr().Mode == mode {
		if cn, ok := ch.Operations().(*node); ok {
			cn.seen(fi)
		}
		return ch
	}
	cn := &node{c: n.c}
	cn.seen(fi)
	return n.NewInode(ctx, cn, fs.StableAttr{Mode: mode})
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if fi, ok := n.c.cached(n.path(), name); ok {
		return n.newChild(ctx, name, fi, out), 0
	}
	fi, err := n.c.sftp.Lstat(n.child(name))
	if err != nil {
		return nil, toErrno(err)
	}
	return n.newChild(ctx, name, fi, out), 0
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	fis, err := n.c.sftp.ReadDir(n.path())
	if err != nil {
		return nil, toErrno(err)
	}
	n.c.remember(n.path(), fis)
	entries := make([]fuse.DirEntry, 0, len(fis))
	for _, fi := range fis {
		var mode uint32
		if st, ok := fi.Sys().(*sftp.FileStat); ok {
			mode = st.Mode & syscall.S_IFMT
		}
		entries = append(entries, fuse.DirEntry{Name: fi.Name(), Mode: mode})
	}
	return fs.NewListDirStream(entries), 0
}

func (n *node) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if n.c.ro {
		return syscall.EROFS
	}
	p := n.path()
	defer n.c.forget(p)
	if size, ok := in.GetSize(); ok {
		if err := n.c.sftp.Truncate(p, int64(size)); err != nil {
			return toErrno(err)
		}
	}
	if mode, ok := in.GetMode(); ok {
		if err := n.c.sftp.Chmod(p, os.FileMode(mode&0o777)|modeBits(mode)); err != nil {
			return toErrno(err)
		}
	}
	uid, uok := in.GetUID()
	gid, gok := in.GetGID()
	if uok || gok {
		fi, err := n.c.sftp.Lstat(p)
		if err != nil {
			return toErrno(err)
		}
		st := fi.Sys().(*sftp.FileStat)
		if !uok {
			uid = st.UID
		}
		if !gok {
			gid = st.GID
		}
		if err := n.c.sftp.Chown(p, int(uid), int(gid)); err != nil {
			return toErrno(err)
		}
	}
	mtime, mok := in.GetMTime()
	atime, aok := in.GetATime()
	if mok || aok {
		now := time.Now()
		if !mok {
			mtime = now
		}
		if !aok {
			atime = now
		}
		if err := n.c.sftp.Chtimes(p, atime, mtime); err != nil {
			return toErrno(err)
		}
	}
	return n.Getattr(ctx, fh, out)
}

// modeBits carries setuid, setgid and sticky through os.FileMode.
func modeBits(mode uint32) os.FileMode {
	var m os.FileMode
	if mode&syscall.S_ISUID != 0 {
		m |= os.ModeSetuid
	}
	if mode&syscall.S_ISGID != 0 {
		m |= os.ModeSetgid
	}
	if mode&syscall.S_ISVTX != 0 {
		m |= os.ModeSticky
	}
	return m
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.c.ro && int(flags)&(os.O_WRONLY|os.O_RDWR|os.O_TRUNC) != 0 {
		return nil, 0, syscall.EROFS
	}
	if rc := n.c.reads.Load(); rc != nil && int(flags)&(os.O_WRONLY|os.O_RDWR|os.O_TRUNC) == 0 {
		fh, err := rc.open(n.path())
		if err != nil {
			return nil, 0, toErrno(err)
		}
		return &handle{rc: rc, fh: fh, c: n.c, p: n.path()}, n.keepCache(), 0
	}
	f, err := n.c.sftp.OpenFile(n.path(), int(flags)&(os.O_WRONLY|os.O_RDWR|os.O_TRUNC))
	if err != nil {
		return nil, 0, toErrno(err)
	}
	return &handle{f: f, c: n.c, p: n.path()}, n.keepCache(), 0
}

// keepCache tells the guest kernel to keep what it has cached of the file
// (FOPEN_KEEP_CACHE) when the host file is the version it was when last
// opened: the same inode, size, mtime and ctime to the nanosecond, as its
// latest attributes say (the kernel asks for them again after the 1 s
// attribute cache, and looked the file up to open it), so an open costs
// no extra round trip. Else the kernel drops its cached pages, as it does
// on every open without the flag. Changes made while the file stays open
// show through the kernel's own check (FUSE_AUTO_INVAL_DATA: a new mtime
// in fresh attributes drops the cache). A guest write changes the version,
// so the next open reads the host again.
func (n *node) keepCache() uint32 {
	n.mu.Lock()
	defer n.mu.Unlock()
	keep := n.latest != version{} && n.cached == n.latest
	n.cached = n.latest
	if keep {
		return fuse.FOPEN_KEEP_CACHE
	}
	return 0
}

func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	if n.c.ro {
		return nil, nil, 0, syscall.EROFS
	}
	p := n.child(name)
	defer n.c.forget(p)
	acc := int(flags) & (os.O_WRONLY | os.O_RDWR)
	f, err := n.c.sftp.OpenFile(p, acc|os.O_CREATE|int(flags)&(os.O_EXCL|os.O_TRUNC))
	if err != nil {
		return nil, nil, 0, toErrno(err)
	}
	if mode&0o7777 != newFileMode {
		if err := n.c.sftp.Chmod(p, os.FileMode(mode&0o777)|modeBits(mode)); err != nil {
			_ = f.Close()
			return nil, nil, 0, toErrno(err)
		}
	}
	fi, err := n.c.sftp.Lstat(p)
	if err != nil {
		_ = f.Close()
		return nil, nil, 0, toErrno(err)
	}
	return n.newChild(ctx, name, fi, out), &handle{f: f, c: n.c, p: p}, 0, 0
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if n.c.ro {
		return nil, syscall.EROFS
	}
	p := n.child(name)
	defer n.c.forget(p)
	if err := n.c.sftp.Mkdir(p); err != nil {
		return nil, toErrno(err)
	}
	if mode&0o7777 != 0o755 {
		if err := n.c.sftp.Chmod(p, os.FileMode(mode&0o777)|modeBits(mode)); err != nil {
			return nil, toErrno(err)
		}
	}
	fi, err := n.c.sftp.Lstat(p)
	if err != nil {
		return nil, toErrno(err)
	}
	return n.newChild(ctx, name, fi, out), 0
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	if n.c.ro {
		return syscall.EROFS
	}
	defer n.c.forget(n.child(name))
	return toErrno(n.c.sftp.Remove(n.child(name)))
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	if n.c.ro {
		return syscall.EROFS
	}
	defer n.c.forget(n.child(name))
	return toErrno(n.c.sftp.RemoveDirectory(n.child(name)))
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	if n.c.ro {
		return syscall.EROFS
	}
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	from, to := n.child(name), np.child(newName)
	defer n.c.forget(from, to)
	switch flags {
	case 0:
		return toErrno(n.c.sftp.PosixRename(from, to))
	case 1: // RENAME_NOREPLACE
		return toErrno(n.c.sftp.Rename(from, to))
	}
	return syscall.EINVAL
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if n.c.ro {
		return nil, syscall.EROFS
	}
	p := n.child(name)
	defer n.c.forget(p)
	if err := n.c.sftp.Symlink(target, p); err != nil {
		return nil, toErrno(err)
	}
	fi, err := n.c.sftp.Lstat(p)
	if err != nil {
		return nil, toErrno(err)
	}
	return n.newChild(ctx, name, fi, out), 0
}

func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if n.c.ro {
		return nil, syscall.EROFS
	}
	t, ok := target.(*node)
	if !ok {
		return nil, syscall.EXDEV
	}
	p := n.child(name)
	defer n.c.forget(p, t.path())
	if err := n.c.sftp.Link(t.path(), p); err != nil {
		return nil, toErrno(err)
	}
	fi, err := n.c.sftp.Lstat(p)
	if err != nil {
		return nil, toErrno(err)
	}
	fillAttr(fi, &out.Attr)
	return t.EmbeddedInode(), 0
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	target, err := n.c.sftp.ReadLink(n.path())
	if err != nil {
		return nil, toErrno(err)
	}
	return []byte(target), 0
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	st, err := n.c.sftp.StatVFS(n.path())
	if err != nil {
		return toErrno(err)
	}
	out.Blocks, out.Bfree, out.Bavail = st.Blocks, st.Bfree, st.Bavail
	out.Files, out.Ffree = st.Files, st.Ffree
	out.Bsize, out.Frsize, out.NameLen = uint32(st.Bsize), uint32(st.Frsize), uint32(st.Namemax)
	return 0
}

// handle is an open host file: an SFTP handle, or for a read-only open
// on a mount with a read stream, a handle on that stream.
type handle struct {
	mu sync.Mutex // the read-ahead windows; Close against in-flight I/O
	f  *sftp.File
	rc *readsClient
	fh uint32
	c  *guestClient
	p  string

	next   int64  // where a sequential read would continue
	buf    []byte // read ahead: the file's bytes at bufOff
	bufOff int64
	ahead  *window // the window after buf, being fetched
}

// window is a read-ahead fetch running in the background.
type window struct {
	off  int64
	data []byte
	err  error
	done chan struct{}
}

var (
	_ fs.FileReader   = (*handle)(nil)
	_ fs.FileWriter   = (*handle)(nil)
	_ fs.FileReleaser = (*handle)(nil)
	_ fs.FileFsyncer  = (*handle)(nil)
	_ fs.FileFlusher  = (*handle)(nil)
)

// readAhead is how much a handle fetches at once when it sees sequential
// reads: one SFTP ReadAt of this size runs many requests in flight, where
// the kernel sends FUSE reads one window after the other, each a round
// trip to the host. While the guest consumes one window the next is
// already on its way (fetchAhead), so the channel never idles between
// windows.
const readAhead = 4 << 20

// windows recycles read-ahead windows: zeroing a fresh 4 MiB one per
// window cost a guest under TCG about a tenth of its agent's time in a
// sequential read.
var windows = sync.Pool{New: func() any { b := make([]byte, readAhead); return &b }}

func getWindow() []byte { return (*windows.Get().(*[]byte))[:readAhead] }

// putWindow gives b back for another window; nothing may use it after.
func putWindow(b []byte) {
	if cap(b) == readAhead {
		b = b[:readAhead]
		windows.Put(&b)
	}
}

// fetchAhead starts fetching the window at off in the background.
func (h *handle) fetchAhead(off int64) {
	w := &window{off: off, data: getWindow(), done: make(chan struct{})}
	h.ahead = w
	go func() {
		defer close(w.done)
		n, err := h.readAt(w.data, off)
		w.data = w.data[:n]
		if err != nil && !errors.Is(err, io.EOF) {
			w.err = err
		}
	}()
}

// dropAhead forgets what was read ahead (a write may have made it stale),
// waiting for a fetch in flight to end.
func (h *handle) dropAhead() {
	if h.ahead != nil {
		<-h.ahead.done
		putWindow(h.ahead.data)
		h.ahead = nil
	}
	h.buf = h.buf[:0]
}

// Read answers from the read-ahead windows where they hold the range, and
// fetches from the host what they do not. It returns fewer bytes than
// asked only at the end of the file: the kernel takes a short read as the
// file's end.
func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n, eof := 0, false
	for n < len(dest) && !eof {
		pos := off + int64(n)
		if pos >= h.bufOff && pos < h.bufOff+int64(len(h.buf)) {
			n += copy(dest[n:], h.buf[pos-h.bufOff:])
			// A window shorter than readAhead ends at the end of the file.
			eof = len(h.buf) < readAhead && off+int64(n) >= h.bufOff+int64(len(h.buf))
			continue
		}
		w := h.ahead
		if w == nil || pos < w.off || pos >= w.off+readAhead {
			break
		}
		// The next window: wait for it and make it the current one.
		<-w.done
		h.ahead = nil
		if w.err != nil {
			putWindow(w.data)
			h.buf = h.buf[:0]
			return nil, toErrno(w.err)
		}
		putWindow(h.buf)
		h.buf, h.bufOff = w.data, w.off
		eof = len(w.data) == 0
	}
	if n < len(dest) && !eof {
		rest := dest[n:]
		pos := off + int64(n)
		if pos == h.next && pos > 0 && len(rest) < readAhead {
			// Sequential: fetch this window now and the next behind it.
			h.dropAhead()
			var buf []byte
			if cap(h.buf) == readAhead {
				buf = h.buf[:readAhead]
			} else {
				buf = getWindow()
			}
			m, err := h.readAt(buf, pos)
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, toErrno(err)
			}
			h.buf, h.bufOff = buf[:m], pos
			n += copy(rest, h.buf)
		} else {
			m, err := h.readAt(rest, pos)
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, toErrno(err)
			}
			n += m
		}
	}
	h.next = off + int64(n)
	// Keep the next window coming while this one is read.
	if h.ahead == nil && len(h.buf) == readAhead && h.next > h.bufOff && h.next <= h.bufOff+readAhead {
		h.fetchAhead(h.bufOff + readAhead)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// readAt reads the host file through the handle's stream.
func (h *handle) readAt(b []byte, off int64) (int, error) {
	if h.rc != nil {
		return h.rc.readAt(h.fh, b, off)
	}
	return h.f.ReadAt(b, off)
}

func (h *handle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	if h.f == nil {
		return 0, syscall.EBADF // opened read-only
	}
	h.mu.Lock()
	h.dropAhead() // what was read ahead may be stale now
	h.mu.Unlock()
	n, err := h.f.WriteAt(data, off)
	h.c.forget(h.p)
	if err != nil {
		return uint32(n), toErrno(err)
	}
	return uint32(n), 0
}

// Flush has nothing to push: every write was acknowledged by the host
// before it returned, so an error has already been reported to write(2).
func (h *handle) Flush(ctx context.Context) syscall.Errno { return 0 }

// Fsync forces what was written through this handle to the host's disk
// before it returns: an fsetstat on the handle carrying FsyncExtension,
// which the host server turns into fsync(2) (fdatasync(2) when the guest
// asked for that) of the descriptors it has open for the file.
func (h *handle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	data := "full"
	if flags&1 != 0 { // FUSE_FSYNC_FDATASYNC
		data = "data"
	}
	ext := []sftp.StatExtended{{ExtType: FsyncExtension, ExtData: data}}
	if h.f == nil {
		return toErrno(h.c.sftp.SetExtendedData(h.p, ext))
	}
	return toErrno(h.f.SetExtendedData(h.p, ext))
}

func (h *handle) Release(ctx context.Context) syscall.Errno {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dropAhead()
	putWindow(h.buf)
	h.buf = nil
	if h.f == nil {
		return toErrno(h.rc.close(h.fh))
	}
	return toErrno(h.f.Close())
}
