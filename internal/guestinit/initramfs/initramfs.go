// Package initramfs is the first stage of banger's guest program: the
// /init of the initramfs banger generates (internal/kernels/initramfs). It
// loads the virtio modules, waits for the root device, mounts it, picks the
// init with package selection and switches to it. It imports little, so the
// initramfs stays small and starts fast under emulation; the rest of the
// guest program (banger's PID 1, the agent) is package guestinit.
//
// Every failure prints one line on the console,
//
//	banger-init: <what failed>: <why>
//
// and powers the guest off, so the VM monitor exits instead of hanging.
package initramfs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/guestinit/selection"
)

const modulesList = guestabi.ModulesList

const newRoot = "/newroot"

var (
	console io.Writer = os.Stdout
	debug   bool
	start   = time.Now()
)

// stepError is a failure of one boot step.
type stepError struct {
	what string
	err  error
}

func (e *stepError) Error() string { return e.what + ": " + e.err.Error() }
func (e *stepError) Unwrap() error { return e.err }

func fail(what string, err error) error { return &stepError{what: what, err: err} }

// Run is the initramfs stage: it never returns. Success ends in
// executing the chosen init; any failure prints one line and powers off.
func Run() {
	defer func() {
		if r := recover(); r != nil {
			powerOff(fmt.Sprintf("banger-init: internal error: %v", r))
		}
	}()
	// run only returns on failure: success ends in exec.
	err := run()
	powerOff("banger-init: " + oneLine(err.Error()))
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// powerOff prints msg and powers the guest off. If that fails, exiting
// PID 1 panics the kernel, which with panic=N reboots and with QEMU's
// -no-reboot exits: still no hang.
func powerOff(msg string) {
	fmt.Fprintln(console, msg)
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		fmt.Fprintf(console, "banger-init: power off: %v\n", err)
	}
	os.Exit(1)
}

func logf(format string, args ...any) {
	if debug {
		fmt.Fprintf(console, "banger-init: [%6dms] %s\n", time.Since(start).Milliseconds(), fmt.Sprintf(format, args...))
	}
}

type config struct {
	choice    guestabi.Init
	root      string
	fstype    string
	flags     uintptr
	data      string
	init      string
	rootwait  time.Duration
	initArgs  []string
	debugMode bool
}

func run() error {
	if err := mountEarly(); err != nil {
		return err
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return fail("read /proc/cmdline", err)
	}
	cfg, err := parseCmdline(string(cmdline))
	if err != nil {
		return fail("parse kernel command line", err)
	}
	debug = cfg.debugMode
	logf("cmdline: %s", strings.TrimSpace(string(cmdline)))
	if err := loadModules(); err != nil {
		return err
	}
	if err := waitForDevice(cfg.root, cfg.rootwait); err != nil {
		return err
	}
	if err := unix.Mount(cfg.root, newRoot, cfg.fstype, cfg.flags, cfg.data); err != nil {
		return fail(fmt.Sprintf("mount root %s (%s) on %s", cfg.root, cfg.fstype, newRoot), err)
	}
	logf("mounted %s (%s) on %s", cfg.root, cfg.fstype, newRoot)
	dec, err := selection.Choose(newRoot, cfg.choice, cfg.init)
	if err != nil {
		return fail("choose init", err)
	}
	logf("starting the %s init %s: %s", dec.Init, dec.Path, dec.Reason)
	cfg.init = dec.Path
	if err := checkInit(cfg.init); err != nil {
		return err
	}
	return switchRoot(cfg)
}

// mountEarly mounts proc, sysfs and devtmpfs, and makes sure the console
// is open on fds 0-2.
func mountEarly() error {
	for _, m := range []struct{ src, dir, fstype string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.dir, 0o755); err != nil {
			return fail("create "+m.dir, err)
		}
		err := unix.Mount(m.src, m.dir, m.fstype, unix.MS_NOSUID|unix.MS_NOEXEC, "")
		if err != nil && !errors.Is(err, unix.EBUSY) {
			return fail("mount "+m.fstype+" on "+m.dir, err)
		}
	}
	// The kernel opens /dev/console for init only if the node existed in
	// the initramfs; reopen it from devtmpfs when fd 1 is not a console.
	if _, err := unix.FcntlInt(1, unix.F_GETFD, 0); err != nil {
		if fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY, 0); err == nil {
			for i := 0; i <= 2; i++ {
				_ = unix.Dup2(fd, i)
			}
			if fd > 2 {
				_ = unix.Close(fd)
			}
		}
	}
	return nil
}

// parseCmdline reads the parameters banger-init honours (guestabi.Parse),
// with the initramfs defaults: root /dev/vda, ext4, read-only unless rw,
// init /sbin/init, a 10 s root wait.
func parseCmdline(s string) (config, error) {
	c, err := guestabi.Parse(s)
	if err != nil {
		return config{}, err
	}
	cfg := config{
		root:      c.RootDevice(),
		fstype:    c.FSType(),
		data:      c.RootFlags,
		init:      c.Init,
		rootwait:  c.RootWaitOrDefault(),
		initArgs:  c.InitArgs,
		debugMode: c.Debug,
		choice:    c.Choice(),
	}
	if !c.ReadWrite {
		cfg.flags |= unix.MS_RDONLY
	}
	return cfg, nil
}

// loadModules loads every module named in the list file, in order.
func loadModules() error {
	data, err := os.ReadFile(modulesList)
	if err != nil {
		return fail("read module list "+modulesList, err)
	}
	n := 0
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name := strings.TrimSuffix(filepath.Base(line), ".ko")
		f, err := os.Open(line) // #nosec G703 -- the list is part of the initramfs banger generated
		if err != nil {
			return fail("load module "+name, err)
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		_ = f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fail("load module "+name+" ("+line+")", err)
		}
		n++
	}
	logf("loaded %d modules", n)
	return nil
}

// waitForDevice polls until dev is a block device, for at most wait.
func waitForDevice(dev string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		var st unix.Stat_t
		err := unix.Stat(dev, &st)
		if err == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
			logf("root device %s is present", dev)
			return nil
		}
		if err == nil {
			return fail("wait for root device "+dev, errors.New("exists but is not a block device"))
		}
		if time.Now().After(deadline) {
			return fail("wait for root device "+dev, fmt.Errorf("not present after %s (block devices: %s); check root= and banger.rootwait=", wait, blockDevices()))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func blockDevices() string {
	ents, err := os.ReadDir("/sys/class/block")
	if err != nil || len(ents) == 0 {
		return "none"
	}
	names := make([]string, 0, len(ents))
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return strings.Join(names, ", ")
}

// checkInit makes sure the real init exists inside the new root, resolving
// symlinks relative to it, before anything is torn down.
func checkInit(init string) error {
	dir, err := unix.Open(newRoot, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return fail("open "+newRoot, err)
	}
	defer unix.Close(dir)
	fd, err := unix.Openat2(dir, strings.TrimPrefix(init, "/"), &unix.OpenHow{Flags: unix.O_PATH, Resolve: unix.RESOLVE_IN_ROOT})
	if errors.Is(err, unix.ENOSYS) {
		return nil // old kernel: exec will tell
	}
	if err != nil {
		return fail("find init "+init+" in the root file system", err)
	}
	var st unix.Stat_t
	serr := unix.Fstat(fd, &st)
	_ = unix.Close(fd)
	if serr == nil && (st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o111 == 0) {
		return fail("find init "+init+" in the root file system", errors.New("not an executable file"))
	}
	return nil
}

// switchRoot moves the early mounts under the new root, frees the
// initramfs, makes the new root "/" and executes the real init.
func switchRoot(cfg config) error {
	for _, d := range []string{"/dev", "/proc", "/sys"} {
		target := newRoot + d
		if st, err := os.Stat(target); err == nil && st.IsDir() {
			if err := unix.Mount(d, target, "", unix.MS_MOVE, ""); err != nil {
				return fail("move "+d+" to "+target, err)
			}
		} else if err := unix.Unmount(d, unix.MNT_DETACH); err != nil {
			return fail("unmount "+d, err)
		}
	}
	if err := os.Chdir(newRoot); err != nil {
		return fail("chdir "+newRoot, err)
	}
	freeInitramfs()
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fail("move "+newRoot+" to /", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fail("chroot "+newRoot, err)
	}
	if err := os.Chdir("/"); err != nil {
		return fail("chdir / in the new root", err)
	}
	logf("executing %s", cfg.init)
	argv := append([]string{cfg.init}, cfg.initArgs...)
	err := unix.Exec(cfg.init, argv, os.Environ())
	return fail("execute init "+cfg.init, err)
}

// freeInitramfs deletes the initramfs contents, staying on its file
// system, when "/" is a ramfs or tmpfs (as busybox switch_root does).
// Failures are ignored: they only cost memory.
func freeInitramfs() {
	var sfs unix.Statfs_t
	if err := unix.Statfs("/", &sfs); err != nil {
		return
	}
	if sfs.Type != unix.RAMFS_MAGIC && sfs.Type != unix.TMPFS_MAGIC {
		return
	}
	var st unix.Stat_t
	if err := unix.Lstat("/", &st); err != nil {
		return
	}
	removeTree("/", st.Dev)
}

func removeTree(dir string, dev uint64) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil || st.Dev != dev {
			continue // another mount, e.g. /newroot
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			removeTree(p, dev)
			_ = unix.Rmdir(p)
		} else {
			_ = unix.Unlink(p)
		}
	}
}

// OnInitramfs reports whether "/" is the initramfs (ramfs or tmpfs).
func OnInitramfs() bool {
	var sfs unix.Statfs_t
	if err := unix.Statfs("/", &sfs); err != nil {
		return false
	}
	return sfs.Type == unix.RAMFS_MAGIC || sfs.Type == unix.TMPFS_MAGIC
}
