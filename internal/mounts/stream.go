package mounts

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ServiceName is the agent service that answers mount streams.
const ServiceName = "mount"

// WireVersion is the mount stream's handshake version.
const WireVersion = 1

// maxLine bounds the handshake lines.
const maxLine = 4096

// handshakeTimeout bounds the handshake, which includes the guest's mount.
const handshakeTimeout = 20 * time.Second

// A mount stream starts with one JSON line each way, then carries SFTP:
//
//	host → guest  {"v":1,"guest_dir":"/src","read_only":true,"name":"/home/me/src"}
//	guest → host  {"ok":true,"reads":1}   or   {"error":"..."}
//
// The guest replies once its FUSE mount is in place, so a host that reads
// "ok" knows the folder is visible in the guest. "reads" is the read
// stream version the guest speaks (reads.go); a host that knows it then
// opens a second stream for the same folder, {"v":1,"guest_dir":"/src",
// "reads":1}, answered {"ok":true}, which carries that protocol. An older
// guest says no "reads" and is served by SFTP alone.
type request struct {
	V        int    `json:"v"`
	GuestDir string `json:"guest_dir"`
	ReadOnly bool   `json:"read_only,omitempty"`
	Name     string `json:"name,omitempty"`
	Reads    int    `json:"reads,omitempty"`
}

type reply struct {
	OK    bool   `json:"ok,omitempty"`
	Reads int    `json:"reads,omitempty"`
	Error string `json:"error,omitempty"`
}

// Streamer opens streams to a guest's agent services (the agent session
// implements it). It is the same contract as portfwd's.
type Streamer interface {
	OpenService(ctx context.Context, service string) (net.Conn, error)
}

// ErrGuest means the guest could not mount the folder.
var ErrGuest = errors.New("guest refused the mount")

// Dial opens a mount stream for s and waits until the guest has mounted
// it. The returned conn then carries the guest's SFTP requests: give it to
// Launcher.Start.
func Dial(ctx context.Context, st Streamer, s Spec) (net.Conn, error) {
	c, _, err := dial(ctx, st, s, request{V: WireVersion, GuestDir: s.GuestDir, ReadOnly: s.ReadOnly, Name: s.HostDir})
	return c, err
}

// DialReads opens the read stream of a folder the guest has mounted
// through Dial. It returns nil and no error when the guest has none.
func DialReads(ctx context.Context, st Streamer, s Spec, main net.Conn) (net.Conn, error) {
	if rc, ok := main.(*dialedConn); !ok || rc.reads != ReadsVersion {
		return nil, nil
	}
	c, _, err := dial(ctx, st, s, request{V: WireVersion, GuestDir: s.GuestDir, Reads: ReadsVersion})
	return c, err
}

// dialedConn is a mount stream that remembers what the guest said.
type dialedConn struct {
	net.Conn
	reads int
}

func dial(ctx context.Context, st Streamer, s Spec, req request) (net.Conn, reply, error) {
	ctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	c, err := st.OpenService(ctx, ServiceName)
	if err != nil {
		return nil, reply{}, fmt.Errorf("mount %s: open stream: %w", s, err)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	fail := func(err error) (net.Conn, reply, error) {
		stop()
		_ = c.Close()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return nil, reply{}, fmt.Errorf("mount %s: %w", s, err)
	}
	if err := writeJSONLine(c, req); err != nil {
		return fail(err)
	}
	var rep reply
	if err := readJSONLine(c, &rep); err != nil {
		return fail(err)
	}
	if !stop() {
		return fail(ctx.Err())
	}
	if !rep.OK {
		return fail(fmt.Errorf("%w: %.300s", ErrGuest, rep.Error))
	}
	return &dialedConn{Conn: c, reads: rep.Reads}, rep, nil
}

func writeJSONLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) >= maxLine {
		return errors.New("handshake line too long")
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// readJSONLine reads one line byte by byte (nothing after it is consumed).
func readJSONLine(r io.Reader, v any) error {
	var buf bytes.Buffer
	var b [1]byte
	for {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return fmt.Errorf("read handshake: %w", err)
		}
		if b[0] == '\n' {
			break
		}
		if buf.Len() >= maxLine {
			return errors.New("handshake line too long")
		}
		buf.WriteByte(b[0])
	}
	if err := json.Unmarshal(buf.Bytes(), v); err != nil {
		return fmt.Errorf("undecodable handshake: %w", err)
	}
	return nil
}

// Guest is the guest side: the agent hands it every stream opened to
// ServiceName.
type Guest struct {
	// Log receives diagnostics; nil discards them.
	Log *slog.Logger
	// CacheTimeout is passed to MountGuest.
	CacheTimeout time.Duration

	mu     sync.Mutex
	boot   map[string]*bootMount   // MountAtBoot's mounts no stream has claimed yet
	served map[string]*guestClient // the mounts a stream serves, for their read streams
}

// bootMount is a folder mounted at boot, waiting for its host stream.
type bootMount struct {
	pm       *pendingMount
	readOnly bool
	timer    *time.Timer
}

// BootAttachTimeout is how long a folder mounted at boot waits for the
// host to serve it. Until then the guest's accesses to it wait (the kernel
// queues them); after it they fail with EIO and the folder is unmounted.
const BootAttachTimeout = 5 * time.Minute

// MountAtBoot mounts each folder in the guest now, before any stream asks
// for it, so a program started at boot finds the folder in place: its
// accesses wait in the kernel until the host's stream for the folder
// arrives (ServeStream then serves this mount) or BootAttachTimeout
// passes. It returns one error per folder that could not be mounted; the
// others are in place.
func (g *Guest) MountAtBoot(specs []Spec, timeout time.Duration) []error {
	if timeout <= 0 {
		timeout = BootAttachTimeout
	}
	var errs []error
	for _, s := range specs {
		if err := g.mountAtBoot(s, timeout); err != nil {
			errs = append(errs, fmt.Errorf("mount %s at boot: %w", s.GuestDir, err))
		}
	}
	return errs
}

func (g *Guest) mountAtBoot(s Spec, timeout time.Duration) error {
	if _, err := ParseSpec("/:" + s.GuestDir); err != nil || filepath.Clean(s.GuestDir) != s.GuestDir {
		return fmt.Errorf("guest folder %.200q: not a clean absolute path other than /", s.GuestDir)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.boot[s.GuestDir] != nil {
		return errors.New("mounted at boot already")
	}
	if err := EnsureFUSE(); err != nil {
		return err
	}
	if err := prepareMountpoint(s.GuestDir); err != nil {
		return err
	}
	pm, err := mountFUSE(s.GuestDir, GuestOptions{ReadOnly: s.ReadOnly, CacheTimeout: g.CacheTimeout, Name: "banger"})
	if err != nil {
		return err
	}
	bm := &bootMount{pm: pm, readOnly: s.ReadOnly}
	bm.timer = time.AfterFunc(timeout, func() {
		if g.claim(s.GuestDir) == bm {
			g.log().Warn("host folder not served in time: unmounting it", "dir", s.GuestDir, "waited", timeout)
			bm.fail()
		}
	})
	if g.boot == nil {
		g.boot = map[string]*bootMount{}
	}
	g.boot[s.GuestDir] = bm
	g.log().Info("mounted host folder at boot, waiting for the host", "dir", s.GuestDir, "read_only", s.ReadOnly)
	return nil
}

// claim takes the boot mount of dir, if any, out of the waiting set.
func (g *Guest) claim(dir string) *bootMount {
	g.mu.Lock()
	defer g.mu.Unlock()
	bm := g.boot[dir]
	delete(g.boot, dir)
	if bm != nil {
		bm.timer.Stop()
	}
	return bm
}

// fail serves the waiting accesses with EIO and unmounts the folder.
func (bm *bootMount) fail() {
	a, b := net.Pipe()
	_ = b.Close()
	if _, err := bm.pm.attach(a); err == nil {
		return // cannot happen: the stream is closed
	}
	// attach unmounted it; a busy one is detached.
	_ = unix.Unmount(bm.pm.dir, unix.MNT_DETACH)
}

// ServeStream mounts the folder the stream asks for and serves it until the
// stream ends (the host stopped the VM's mounts, or the daemon went away)
// or ctx is done; then it unmounts. It closes c.
func (g *Guest) ServeStream(ctx context.Context, c net.Conn) error {
	_ = c.SetDeadline(time.Now().Add(handshakeTimeout))
	var req request
	if err := readJSONLine(c, &req); err != nil {
		_ = c.Close()
		return err
	}
	refuse := func(err error) error {
		_ = writeJSONLine(c, reply{Error: err.Error()})
		_ = c.Close()
		return fmt.Errorf("mount %s: %w", req.GuestDir, err)
	}
	if req.V != WireVersion {
		return refuse(fmt.Errorf("guest speaks mount v%d, request is v%d", WireVersion, req.V))
	}
	if _, err := ParseSpec("/:" + req.GuestDir); err != nil || filepath.Clean(req.GuestDir) != req.GuestDir {
		return refuse(fmt.Errorf("guest folder %.200q: not a clean absolute path other than /", req.GuestDir))
	}
	if req.Reads != 0 {
		return g.serveReads(ctx, c, req, refuse)
	}
	pm, err := g.mountFor(req)
	if err != nil {
		return refuse(err)
	}
	// The mount takes a read stream from now on: the host may open it
	// before it starts the SFTP server.
	gc := pm.root.c
	g.mu.Lock()
	if g.served == nil {
		g.served = map[string]*guestClient{}
	}
	g.served[req.GuestDir] = gc
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		if g.served[req.GuestDir] == gc {
			delete(g.served, req.GuestDir)
		}
		g.mu.Unlock()
		if rc := gc.reads.Swap(nil); rc != nil {
			_ = rc.conn.Close()
		}
	}()
	// The reply goes before the SFTP session starts: the host hands the
	// stream to its SFTP server only after reading it.
	if err := writeJSONLine(c, reply{OK: true, Reads: ReadsVersion}); err != nil {
		_ = c.Close()
		_, _ = pm.attach(c) // a closed stream: serves EIO just long enough to unmount
		return err
	}
	_ = c.SetDeadline(time.Time{})
	m, err := pm.attach(c)
	if err != nil {
		return err
	}
	g.log().Info("mounted host folder", "dir", req.GuestDir, "host", sanitizeName(req.Name), "read_only", req.ReadOnly)
	return g.serve(ctx, m)
}

// serveReads gives the mount served at req.GuestDir the read stream c
// until c or the mount ends.
func (g *Guest) serveReads(ctx context.Context, c net.Conn, req request, refuse func(error) error) error {
	if req.Reads != ReadsVersion {
		return refuse(fmt.Errorf("guest speaks read stream v%d, request is v%d", ReadsVersion, req.Reads))
	}
	// The host opens the read stream once it has read the folder's "ok",
	// sent once the mount takes it.
	g.mu.Lock()
	m := g.served[req.GuestDir]
	g.mu.Unlock()
	if m == nil {
		return refuse(errors.New("no folder is served there"))
	}
	if err := writeJSONLine(c, reply{OK: true}); err != nil {
		_ = c.Close()
		return err
	}
	_ = c.SetDeadline(time.Time{})
	rc := newReadsClient(c)
	if old := m.reads.Swap(rc); old != nil {
		_ = old.conn.Close()
	}
	defer m.reads.CompareAndSwap(rc, nil)
	select {
	case <-ctx.Done():
		_ = c.Close()
	case <-rc.done:
	}
	return nil
}

// mountFor is the FUSE mount to serve req: the one made at boot for the
// folder when there is one of the same kind, else a new one.
func (g *Guest) mountFor(req request) (*pendingMount, error) {
	if bm := g.claim(req.GuestDir); bm != nil {
		if bm.readOnly == req.ReadOnly {
			return bm.pm, nil
		}
		bm.fail() // the VM's record changed since boot: mount as asked now
	}
	if err := EnsureFUSE(); err != nil {
		return nil, err
	}
	if err := prepareMountpoint(req.GuestDir); err != nil {
		return nil, err
	}
	return mountFUSE(req.GuestDir, GuestOptions{ReadOnly: req.ReadOnly, CacheTimeout: g.CacheTimeout, Name: sanitizeName(req.Name)})
}

func (g *Guest) log() *slog.Logger {
	if g.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return g.Log
}

// sanitizeName keeps the host path shown as the mount source printable and
// free of the separators /proc/mounts uses.
func sanitizeName(s string) string {
	if len(s) > 200 {
		s = s[:200]
	}
	return strings.Map(func(r rune) rune {
		if r <= ' ' || r == 0x7f || r == ',' {
			return '_'
		}
		return r
	}, s)
}

// prepareMountpoint makes the guest folder (and its parents) when missing;
// an existing one must be a directory.
func prepareMountpoint(dir string) error {
	fi, err := os.Lstat(dir)
	if errors.Is(err, unix.ENOTCONN) {
		// A mount whose server died with an earlier agent: detach it.
		if uerr := unix.Unmount(dir, unix.MNT_DETACH); uerr != nil {
			return fmt.Errorf("%s is a dead mount and cannot be detached: %w", dir, uerr)
		}
		fi, err = os.Lstat(dir)
	}
	switch {
	case err == nil && fi.IsDir():
		return nil
	case err == nil:
		return fmt.Errorf("%s exists and is not a directory", dir)
	case errors.Is(err, os.ErrNotExist):
		return os.MkdirAll(dir, 0o755)
	}
	return err
}

// EnsureFUSE makes /dev/fuse available: when it is missing it loads the
// fuse module from /lib/modules/<release> (finit_module; compressed
// modules need the kernel's in-kernel decompression).
func EnsureFUSE() error {
	if _, err := os.Stat("/dev/fuse"); err == nil {
		return nil
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return fmt.Errorf("load fuse: %w", err)
	}
	release := unix.ByteSliceToString(uts.Release[:])
	var tried []string
	for _, name := range []string{"fuse.ko", "fuse.ko.xz", "fuse.ko.zst", "fuse.ko.gz"} {
		p := filepath.Join("/lib/modules", release, "kernel/fs/fuse", name)
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		flags := 0
		if name != "fuse.ko" {
			flags = unix.MODULE_INIT_COMPRESSED_FILE
		}
		err = unix.FinitModule(int(f.Fd()), "", flags)
		_ = f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			tried = append(tried, fmt.Sprintf("%s: %v", p, err))
			continue
		}
		break
	}
	if err := waitFor("/dev/fuse", 2*time.Second); err != nil {
		return fmt.Errorf("no /dev/fuse in the guest: the kernel needs CONFIG_FUSE_FS (as a module in /lib/modules/%s or built in) (%s)", release, strings.Join(tried, "; "))
	}
	return nil
}

func waitFor(p string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		_, err := os.Stat(p)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (g *Guest) serve(ctx context.Context, m *GuestMount) error {
	done := make(chan struct{})
	go func() {
		_ = m.client.Wait()
		close(done)
	}()
	select {
	case <-ctx.Done():
	case <-done:
	}
	if err := m.server.Unmount(); err != nil {
		// Busy (a process has its cwd there): detach it; its I/O fails.
		_ = unix.Unmount(m.dir, unix.MNT_DETACH)
	}
	_ = m.client.Close()
	return nil
}
