// Package daemon is banger's root daemon and its composition root: it opens
// the state store, wires the services (images, lifecycle, reconciler), runs
// start-up recovery, and serves the API of package api on a Unix socket.
// Its handlers decode requests, authorize the caller (SO_PEERCRED) and call
// a service; the mechanisms live in the services and below them.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/failpoint"
	"github.com/bangerdev/banger/internal/images"
	"github.com/bangerdev/banger/internal/lifecycle"
	"github.com/bangerdev/banger/internal/lockfile"
	"github.com/bangerdev/banger/internal/reconciler"
	"github.com/bangerdev/banger/internal/snapshot"
	"github.com/bangerdev/banger/internal/store"
	"golang.org/x/sys/unix"
)

// Version is the banger version, set by the build (-ldflags -X).
var Version = "dev"

// Options configure a daemon.
type Options struct {
	Config config.Config
	Logger *slog.Logger
}

// Daemon is a running banger daemon.
type Daemon struct {
	cfg   config.Config
	log   *slog.Logger
	lock  *lockfile.Lock
	store *store.Store
	mux   *http.ServeMux

	img  *images.Service
	life *lifecycle.Service
	rec  *reconciler.Reconciler

	// bgCtx is the context of background work (VM supervisors); it ends
	// when the daemon shuts down.
	bgCtx    context.Context
	bgCancel context.CancelFunc
}

// New prepares a daemon: it creates the state, cache and runtime dirs, takes
// the single-daemon lock, opens the store and runs start-up recovery. It does
// not listen yet; call Serve.
func New(ctx context.Context, opts Options) (*Daemon, error) {
	cfg := opts.Config
	if err := cfg.Validate(); err != nil {
		return nil, api.Errorf(api.CodeInvalid, "%v", err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	for _, dir := range []string{cfg.StateDir, cfg.CacheDir, cfg.RuntimeDir, cfg.ImagesDir(), cfg.KernelsDir()} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", dir, err)
		}
	}
	// VM dirs hold users' disks and consoles, and their names are VM ids:
	// no other user may list or enter them (an older banger made it 0755).
	if err := os.MkdirAll(cfg.VMsDir(), 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", cfg.VMsDir(), err)
	}
	if err := os.Chmod(cfg.VMsDir(), 0o700); err != nil {
		return nil, fmt.Errorf("make %s private: %w", cfg.VMsDir(), err)
	}
	lock, err := lockfile.Acquire(cfg.LockPath())
	if err != nil {
		return nil, err
	}
	st, err := store.Open(cfg.DBPath(), 5*time.Second)
	if err != nil {
		_ = lock.Release()
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: log, lock: lock, store: st}
	d.bgCtx, d.bgCancel = context.WithCancel(context.Background())
	d.img = images.New(cfg, st, log)
	snaps := snapshot.NewStore(filepath.Join(cfg.StateDir, "snapshots"))
	snaps.Failpoint = failpoint.Reach
	d.life = lifecycle.New(lifecycle.Options{Config: cfg, Store: st, Logger: log, Kernels: d.img, Background: d.bgCtx, Snapshots: snaps})
	d.rec = &reconciler.Reconciler{Config: cfg, Store: st, Life: d.life, Log: log}
	d.mux = d.routes()
	if err := d.recover(ctx); err != nil {
		d.close()
		return nil, fmt.Errorf("start-up recovery: %w", err)
	}
	return d, nil
}

// Store returns the daemon's state store (for tests and benchmarks).
func (d *Daemon) Store() *store.Store { return d.store }

// Handler returns the API handler (for in-process tests).
func (d *Daemon) Handler() http.Handler { return d.mux }

// Lifecycle returns the VM lifecycle service; its Supervisor(id) holds a
// running VM's agent session.
func (d *Daemon) Lifecycle() *lifecycle.Service { return d.life }

func (d *Daemon) close() {
	d.bgCancel()
	if err := d.store.Close(); err != nil {
		d.log.Error("close store", "err", err)
	}
	if err := d.lock.Release(); err != nil {
		d.log.Error("release lock", "err", err)
	}
}

// Listen creates the API socket: stale sockets are replaced, the socket is
// mode 0660 and, when the configured group exists, owned by that group.
func (d *Daemon) Listen() (net.Listener, error) {
	sock := d.cfg.Socket
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	// We hold the state lock, so a socket here is a leftover of a daemon that
	// died; but refuse to remove anything that is not a socket.
	if fi, err := os.Lstat(sock); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("socket path %s exists and is not a socket: remove it or choose another --socket", sock)
		}
		if err := os.Remove(sock); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", sock, err)
		}
	}
	// Create the socket owner-only, then open it to the group: there is
	// never a moment when another user could connect.
	oldMask := unix.Umask(0o177)
	ln, err := net.Listen("unix", sock)
	unix.Umask(oldMask)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", sock, err)
	}
	if err := os.Chmod(sock, 0o660); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("chmod socket: %w", err)
	}
	if d.cfg.SocketGroup != "" {
		if g, err := user.LookupGroup(d.cfg.SocketGroup); err == nil {
			gid, _ := strconv.Atoi(g.Gid)
			if err := os.Chown(sock, -1, gid); err != nil {
				d.log.Warn("cannot give the socket to its group", "group", d.cfg.SocketGroup, "err", err)
			}
		} else {
			d.log.Info("socket group does not exist; only root can use the socket", "group", d.cfg.SocketGroup)
		}
	}
	return ln, nil
}

// Serve answers API requests on ln until ctx is done, then shuts down: it
// stops accepting, waits briefly for requests in flight, removes the socket,
// closes the store and releases the lock.
func (d *Daemon) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           d.logRequests(d.mux),
		ConnContext:       connContext,
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	if ul, ok := ln.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(true)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	d.log.Info("banger daemon listening", "socket", d.cfg.Socket, "state_dir", d.cfg.StateDir, "version", Version, "pid", os.Getpid())
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdownCtx)
	// New VM disks still being flushed are waited for, so that a clean
	// restart does not have their starts copy the image again.
	if err := d.life.WaitDiskFlushes(shutdownCtx); err != nil {
		d.log.Warn("shutdown: a new VM disk was not flushed in time; its VM's start copies the image again", "err", err)
	}
	_ = os.Remove(d.cfg.Socket)
	d.close()
	d.log.Info("banger daemon stopped")
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

func (d *Daemon) logRequests(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		h.ServeHTTP(w, r)
		d.log.Debug("request", "method", r.Method, "path", r.URL.Path, "uid", CallerFrom(r.Context()).UID, "duration", time.Since(start))
	})
}

// routes is the API's one route table: every endpoint the daemon serves.
func (d *Daemon) routes() *http.ServeMux {
	m := http.NewServeMux()
	p := api.Prefix
	m.HandleFunc("GET "+p+"/version", d.handleVersion)

	m.HandleFunc("GET "+p+"/images", d.handleImageList)
	m.HandleFunc("GET "+p+"/images/{name}", d.handleImageGet)
	m.HandleFunc("DELETE "+p+"/images/{name}", d.handleImageDelete)

	m.HandleFunc("GET "+p+"/kernels", d.handleKernelList)
	m.HandleFunc("GET "+p+"/kernels/{name}", d.handleKernelGet)
	m.HandleFunc("DELETE "+p+"/kernels/{name}", d.handleKernelDelete)

	m.HandleFunc("POST "+p+"/images/pull", d.handleImagePull)
	m.HandleFunc("POST "+p+"/images/cache/prune", d.handleCachePrune)
	m.HandleFunc("GET "+p+"/images/catalog", d.handleImageCatalog)
	m.HandleFunc("POST "+p+"/images/{name}/refresh-agent", d.handleImageRefreshAgent)

	m.HandleFunc("POST "+p+"/kernels/import", d.handleKernelImport)
	m.HandleFunc("POST "+p+"/kernels/pull", d.handleKernelPull)

	m.HandleFunc("GET "+p+"/vms", d.handleVMList)
	m.HandleFunc("GET "+p+"/vms/{name}", d.handleVMGet)
	m.HandleFunc("POST "+p+"/vms", d.handleVMCreate)
	m.HandleFunc("POST "+p+"/vms/{name}/start", d.handleVMStart)
	m.HandleFunc("POST "+p+"/vms/{name}/stop", d.handleVMStop)
	m.HandleFunc("POST "+p+"/vms/{name}/restart", d.handleVMRestart)
	m.HandleFunc("DELETE "+p+"/vms/{name}", d.handleVMDelete)
	m.HandleFunc("GET "+p+"/vms/{name}/logs", d.handleVMLogs)
	d.accessRoutes(m, p)
	m.HandleFunc("POST "+p+"/vms/{name}/port-forward", d.handleVMPortForward) // portforward.go
	m.HandleFunc("POST "+p+"/vms/{name}/snapshot", d.handleVMSnapshot)

	m.HandleFunc("GET "+p+"/snapshots", d.handleSnapshotList)
	m.HandleFunc("GET "+p+"/snapshots/{name}", d.handleSnapshotGet)
	m.HandleFunc("DELETE "+p+"/snapshots/{name}", d.handleSnapshotDelete)
	m.HandleFunc("POST "+p+"/snapshots/{name}/clone", d.handleSnapshotClone)

	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		d.writeError(w, r, api.Errorf(api.CodeNotFound, "no API endpoint %s %s (is the CLI newer than the daemon?)", r.Method, r.URL.Path))
	})
	return m
}

func (d *Daemon) handleVersion(w http.ResponseWriter, r *http.Request) {
	v, _ := d.store.SchemaVersion()
	writeJSON(w, http.StatusOK, api.VersionInfo{
		Version: Version, GoVersion: runtime.Version(), PID: os.Getpid(), SchemaVersion: v,
		StateDir: d.cfg.StateDir, CacheDir: d.cfg.CacheDir, RuntimeDir: d.cfg.RuntimeDir,
		CallerUID: CallerFrom(r.Context()).UID,
	})
}
