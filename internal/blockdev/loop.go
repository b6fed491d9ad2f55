package blockdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/privdir"
)

// LockPath is the lock file that serializes loop and dm operations between
// processes (the daemon, tests, tools); a package mutex serializes them
// within one process. Concurrent attachers otherwise race for the same free
// loop device. It lives in root's runtime dir, which no other user can
// write (see privdir): in a world-writable dir such as /run/lock any user
// could hold the lock and hang every VM start, stop and teardown, or plant a
// symlink so that root creates a file where they choose.
var LockPath = "/run/banger/locks/blockdev.lock"

var procLock sync.Mutex

// lock takes the package mutex and the flock on LockPath, polling so that
// ctx can cancel the wait. The lock's dir must be private (owned by this
// process's euid, not group or world writable) and the file is opened
// without following symlinks.
func lock(ctx context.Context) (unlock func(), err error) {
	procLock.Lock()
	f, err := privdir.OpenFile(LockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		procLock.Unlock()
		return nil, fmt.Errorf("blockdev lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			_ = f.Close()
			procLock.Unlock()
			return nil, fmt.Errorf("blockdev lock %s: %w", LockPath, err)
		}
		select {
		case <-ctx.Done():
			_ = f.Close()
			procLock.Unlock()
			return nil, fmt.Errorf("blockdev lock %s: %w", LockPath, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
	return func() {
		_ = f.Close() // releases the flock
		procLock.Unlock()
	}, nil
}

var loopDevRE = regexp.MustCompile(`^/dev/loop([0-9]+)$`)

// AttachLoop binds file to a free loop device and returns its path
// (/dev/loopN). The device stays bound after banger exits, until
// DetachLoop. It uses the kernel interface directly: LOOP_CTL_GET_FREE on
// /dev/loop-control, then LOOP_CONFIGURE (LOOP_SET_FD + LOOP_SET_STATUS64
// on kernels before 5.8), retrying when another process took the device
// first. That avoids parsing losetup's output and reports exact errors.
func AttachLoop(ctx context.Context, file string, readOnly bool) (string, error) {
	unlock, err := lock(ctx)
	if err != nil {
		return "", fmt.Errorf("attach loop %q: %w", file, err)
	}
	defer unlock()
	dev, err := attachLoopLocked(ctx, file, readOnly)
	if err != nil {
		return "", fmt.Errorf("attach loop %q: %w", file, err)
	}
	return dev, nil
}

func attachLoopLocked(ctx context.Context, file string, readOnly bool) (string, error) {
	path := canonical(file)
	mode := os.O_RDWR
	if readOnly {
		mode = os.O_RDONLY
	}
	backing, err := os.OpenFile(path, mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer backing.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer ctl.Close()

	var info unix.LoopInfo64
	copy(info.File_name[:len(info.File_name)-1], path)
	if readOnly {
		info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		err = configureLoop(dev, n, backing, &info, mode)
		if errors.Is(err, unix.EBUSY) && attempt < 100 {
			continue // another process bound it between GET_FREE and CONFIGURE
		}
		if err != nil {
			return "", fmt.Errorf("bind %s: %w", dev, err)
		}
		return dev, nil
	}
}

func configureLoop(dev string, n int, backing *os.File, info *unix.LoopInfo64, mode int) error {
	f, err := os.OpenFile(dev, mode|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		// No udev/devtmpfs node yet (containers): make it.
		if err := unix.Mknod(dev, unix.S_IFBLK|0o660, int(unix.Mkdev(7, uint32(n)))); err != nil && !errors.Is(err, unix.EEXIST) { //nolint:gosec // n is a small kernel-assigned index
			return fmt.Errorf("mknod: %w", err)
		}
		f, err = os.OpenFile(dev, mode|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return err
	}
	defer f.Close()
	cfg := unix.LoopConfig{Fd: uint32(backing.Fd()), Info: *info} //nolint:gosec // fds fit in uint32
	err = unix.IoctlLoopConfigure(int(f.Fd()), &cfg)
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		return err
	}
	// Kernels before 5.8 lack LOOP_CONFIGURE.
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_SET_FD, int(backing.Fd())); err != nil {
		return err
	}
	if err := unix.IoctlLoopSetStatus64(int(f.Fd()), info); err != nil {
		_ = unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
		return err
	}
	return nil
}

// LoopBacking returns the backing file of the loop device dev as the kernel
// reports it (/sys/block/loopN/loop/backing_file), without the " (deleted)"
// suffix the kernel adds for unlinked files, and whether the device is
// bound at all.
func LoopBacking(dev string) (backing string, bound bool, err error) {
	m := loopDevRE.FindStringSubmatch(dev)
	if m == nil {
		return "", false, fmt.Errorf("%q is not a loop device path (/dev/loopN)", dev)
	}
	b, err := os.ReadFile("/sys/block/loop" + m[1] + "/loop/backing_file")
	if errors.Is(err, os.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	s := strings.TrimSuffix(string(b), "\n")
	return strings.TrimSuffix(s, " (deleted)"), true, nil
}

// FindLoopsByBackingFile returns the loop devices bound to file, found
// through /sys/block/loopN/loop/backing_file rather than a stored number.
func FindLoopsByBackingFile(file string) ([]string, error) {
	want := canonical(file)
	loops, err := ListLoops()
	if err != nil {
		return nil, err
	}
	var devs []string
	for _, l := range loops {
		if l.BackingFile == want {
			devs = append(devs, l.Device)
		}
	}
	return devs, nil
}

func loopNum(dev string) int {
	n, _ := strconv.Atoi(strings.TrimPrefix(dev, "/dev/loop"))
	return n
}

// DetachLoop unbinds the loop device dev, but only if its backing file is
// expectBacking and lies under stateDir (a path inside it, compared after
// cleaning and resolving symlinks, so /var/lib/banger-evil is not under
// /var/lib/banger). Otherwise it returns ErrNotOurs and leaves the device
// alone. A device that no longer exists or is unbound counts as detached.
func DetachLoop(ctx context.Context, dev, expectBacking, stateDir string) error {
	if !loopDevRE.MatchString(dev) {
		return fmt.Errorf("detach loop %q: not a loop device path", dev)
	}
	want, state := canonical(expectBacking), canonical(stateDir)
	if !isUnder(want, state) {
		return fmt.Errorf("detach loop %s: backing file %q is not under the state dir %q: %w", dev, expectBacking, stateDir, ErrNotOurs)
	}
	unlock, err := lock(ctx)
	if err != nil {
		return fmt.Errorf("detach loop %s: %w", dev, err)
	}
	defer unlock()
	backing, bound, err := LoopBacking(dev)
	if err != nil {
		return fmt.Errorf("detach loop %s: %w", dev, err)
	}
	if !bound {
		return nil
	}
	if backing != want || !isUnder(backing, state) {
		return fmt.Errorf("detach loop %s: it is backed by %q, not %q: %w", dev, backing, want, ErrNotOurs)
	}
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("detach loop %s: %w", dev, err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("detach loop %s (LOOP_CLR_FD): %w", dev, err)
	}
	return nil
}

// loopBackend is the loop device interface Manager uses; tests substitute
// a recorder to check the order of operations.
type loopBackend interface {
	Attach(ctx context.Context, file string, readOnly bool) (string, error)
	Find(file string) ([]string, error)
	Detach(ctx context.Context, dev, expectBacking, stateDir string) error
}

type kernelLoops struct{}

func (kernelLoops) Attach(ctx context.Context, file string, ro bool) (string, error) {
	return AttachLoop(ctx, file, ro)
}
func (kernelLoops) Find(file string) ([]string, error) { return FindLoopsByBackingFile(file) }
func (kernelLoops) Detach(ctx context.Context, dev, expect, stateDir string) error {
	return DetachLoop(ctx, dev, expect, stateDir)
}

// detachByBacking detaches every loop device bound to backing, which must
// lie under the state dir.
func (m *Manager) detachByBacking(ctx context.Context, backing string) error {
	if !isUnder(canonical(backing), canonical(m.StateDir)) {
		return fmt.Errorf("detach loops of %s: not under the state dir %s: %w", backing, m.StateDir, ErrNotOurs)
	}
	devs, err := m.loop().Find(backing)
	if err != nil {
		return fmt.Errorf("find loops of %s: %w", backing, err)
	}
	var errs []error
	for _, dev := range devs {
		errs = append(errs, m.loop().Detach(ctx, dev, backing, m.StateDir))
	}
	return errors.Join(errs...)
}

// Loop is a loop device and the file behind it: one of a dm-snapshot
// disk's loops (Disk.Loops), or a bound device as ListLoops reports it.
type Loop struct {
	Device      string `json:"device"` // /dev/loopN, a hint only: found again by BackingFile
	BackingFile string `json:"backing_file"`
	ReadOnly    bool   `json:"read_only,omitempty"`
}

// ListLoops returns every bound loop device with its backing file, in
// device order. The orphan scan reads it instead of parsing sysfs itself.
func ListLoops() ([]Loop, error) {
	files, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return nil, err
	}
	var loops []Loop
	for _, f := range files {
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(f)))
		backing, bound, err := LoopBacking(dev)
		if err != nil || !bound {
			continue // unbound meanwhile
		}
		loops = append(loops, Loop{Device: dev, BackingFile: backing})
	}
	sort.Slice(loops, func(i, j int) bool { return loopNum(loops[i].Device) < loopNum(loops[j].Device) })
	return loops, nil
}
