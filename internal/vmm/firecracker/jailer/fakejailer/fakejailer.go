// Package fakejailer stands in for Firecracker's jailer on hosts without
// it. It is as strict as the jailer's documented contract (it parses its
// command line with jailer.Parse: unknown or repeated flags, a bad --id, a
// relative or non-canonical path, an exec file whose name lacks
// "firecracker", --id among Firecracker's arguments are all refused) and
// performs the jailer's steps, in its order, as far as this host allows:
//
//   - it must run as root; it checks that --exec-file is a canonical,
//     executable regular file and that --netns is a namespace handle;
//   - it clears the environment, makes <base>/<exec-file-name>/<id>/root
//     (nothing is done if it exists), copies the exec file into it, and
//     bounds no-file to 2048 unless --resource-limit says otherwise;
//   - for each --cgroup <controller>.<file>=<value> it finds the
//     controller's mount in /proc/mounts (cgroup v1: the mount with that
//     controller option; v2: the cgroup2 mount whose cgroup.controllers
//     lists it), makes <mount>/<parent-cgroup>/<id>, moves itself into it
//     (tasks or cgroup.procs) and writes the value;
//   - it unshares its mount namespace, bind-mounts the chroot on itself,
//     pivot_roots into it, detaches the old root and chroots;
//   - it makes /dev/net/tun (10:200) and /dev/kvm (10:232), mode 0600,
//     and chowns them and / to --uid:--gid;
//   - it joins --netns when given; --daemonize is honoured (setsid, stdio
//     to /dev/null);
//   - with --new-pid-ns it clones a child into a new pid namespace, writes
//     the child's host pid to /<exec-file-name>.pid and exits 0; the child
//     (or, without the flag, the jailer itself) drops to --uid/--gid with
//     no supplementary groups and execs
//     /<exec-file-name> --id=<id> --start-time-us=N --start-time-cpu-us=N
//     followed by the arguments after "--".
//
// Errors go to stderr with exit status 1 (2 for a refused command line).
package fakejailer

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer"
)

func init() {
	// Namespace and root changes are per thread: every step runs on the
	// main thread, which execs (or forks) at the end.
	runtime.LockOSThread()
}

// Main runs the fake jailer with args (without the program name) and
// returns its exit status.
func Main(args []string) int {
	start := time.Now()
	inv, err := jailer.Parse(args)
	if err != nil {
		fmt.Fprintln(os.Stderr, "banger-fake-jailer:", err)
		return 2
	}
	if err := run(inv, start); err != nil {
		fmt.Fprintln(os.Stderr, "banger-fake-jailer:", err)
		return 1
	}
	return 0
}

func run(inv jailer.Invocation, start time.Time) error {
	if os.Geteuid() != 0 {
		return errors.New("the jailer runs as root")
	}
	if real, err := filepath.EvalSymlinks(inv.ExecFile); err != nil || real != inv.ExecFile {
		return fmt.Errorf("--exec-file %s: not a canonical path (%w)", inv.ExecFile, err)
	}
	if fi, err := os.Stat(inv.ExecFile); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("--exec-file %s: not an executable file (%w)", inv.ExecFile, err)
	}
	netns := -1
	if inv.NetNS != "" {
		fd, err := unix.Open(inv.NetNS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("--netns %s: %w", inv.NetNS, err)
		}
		var st unix.Statfs_t
		if err := unix.Fstatfs(fd, &st); err != nil || st.Type != unix.NSFS_MAGIC {
			return fmt.Errorf("--netns %s: not a namespace handle", inv.NetNS)
		}
		netns = fd
	}
	os.Clearenv()
	root := inv.ChrootDir()
	if err := os.MkdirAll(root, 0o755); err != nil { //nolint:gosec // the jailer's own layout
		return err
	}
	name := inv.ExecName()
	if err := copyFile(inv.ExecFile, filepath.Join(root, name)); err != nil {
		return fmt.Errorf("copy exec file: %w", err)
	}
	if err := limits(inv.ResourceLimits); err != nil {
		return err
	}
	if err := cgroups(inv); err != nil {
		return err
	}
	if err := pivot(root); err != nil {
		return err
	}
	for _, d := range []struct {
		path         string
		major, minor uint32
	}{{"/dev/net/tun", 10, 200}, {"/dev/kvm", 10, 232}} {
		if err := os.MkdirAll(filepath.Dir(d.path), 0o755); err != nil { //nolint:gosec // /dev inside the jail
			return err
		}
		if err := unix.Mknod(d.path, unix.S_IFCHR|0o600, int(unix.Mkdev(d.major, d.minor))); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("mknod %s: %w", d.path, err)
		}
		if err := os.Chown(d.path, int(inv.UID), int(inv.GID)); err != nil {
			return err
		}
	}
	if err := os.Chown("/", int(inv.UID), int(inv.GID)); err != nil {
		return err
	}
	if netns >= 0 {
		if err := unix.Setns(netns, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("join --netns %s: %w", inv.NetNS, err)
		}
		_ = unix.Close(netns)
	}
	if inv.Daemonize {
		if _, err := unix.Setsid(); err != nil {
			return fmt.Errorf("--daemonize: setsid: %w", err)
		}
		null, err := unix.Open("/dev/null", unix.O_RDWR, 0)
		if err != nil {
			// no /dev/null inside the jail: make one, as the real jailer
			// opens it before entering
			if err := unix.Mknod("/dev/null", unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
				return err
			}
			if null, err = unix.Open("/dev/null", unix.O_RDWR, 0); err != nil {
				return err
			}
		}
		for fd := 0; fd < 3; fd++ {
			_ = unix.Dup2(null, fd)
		}
		_ = unix.Close(null)
	}
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	argv := append([]string{"/" + name, "--id=" + inv.ID,
		"--start-time-us=" + strconv.FormatInt(start.UnixMicro(), 10),
		"--start-time-cpu-us=" + strconv.FormatInt(cpu.Microseconds(), 10)}, inv.Extra...)
	cred := &syscall.Credential{Uid: inv.UID, Gid: inv.GID, Groups: []uint32{}}
	if inv.NewPIDNS {
		pid, err := syscall.ForkExec(argv[0], argv, &syscall.ProcAttr{
			Dir:   "/",
			Env:   []string{},
			Files: []uintptr{0, 1, 2},
			Sys:   &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID, Credential: cred},
		})
		if err != nil {
			return fmt.Errorf("clone into a new pid namespace: %w", err)
		}
		if err := os.WriteFile("/"+name+".pid", []byte(strconv.Itoa(pid)), 0o644); err != nil { //nolint:gosec // the jailer's pid file is public
			_ = unix.Kill(pid, unix.SIGKILL)
			return err
		}
		return nil
	}
	if err := unix.Setgroups(nil); err != nil {
		return err
	}
	if err := unix.Setresgid(int(inv.GID), int(inv.GID), int(inv.GID)); err != nil {
		return err
	}
	if err := unix.Setresuid(int(inv.UID), int(inv.UID), int(inv.UID)); err != nil {
		return err
	}
	return unix.Exec(argv[0], argv, []string{})
}

func copyFile(src, dst string) error {
	in, err := os.Open(src) //nolint:gosec // the exec file, checked above
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, 0o755) //nolint:gosec // an executable
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}

func limits(rl []string) error {
	nofile := uint64(2048)
	for _, r := range rl {
		k, v, _ := strings.Cut(r, "=")
		n, _ := strconv.ParseUint(v, 10, 64)
		switch k {
		case "no-file":
			nofile = n
		case "fsize":
			if err := unix.Setrlimit(unix.RLIMIT_FSIZE, &unix.Rlimit{Cur: n, Max: n}); err != nil {
				return fmt.Errorf("--resource-limit %s: %w", r, err)
			}
		}
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: nofile, Max: nofile}); err != nil {
		return fmt.Errorf("limit no-file: %w", err)
	}
	return nil
}

// cgroups makes the VM's cgroups, moves the jailer into them and writes
// the values.
func cgroups(inv jailer.Invocation) error {
	version := inv.CgroupVersion
	if version == 0 {
		version = 1
	}
	for _, c := range inv.Cgroups {
		file, value, _ := strings.Cut(c, "=")
		controller, _, _ := strings.Cut(file, ".")
		mnt, err := controllerMount(version, controller)
		if err != nil {
			return fmt.Errorf("--cgroup %s: %w", c, err)
		}
		dir := filepath.Join(mnt, inv.Parent(), inv.ID)
		if err := os.MkdirAll(dir, 0o755); err != nil { //nolint:gosec // cgroup dirs
			return fmt.Errorf("--cgroup %s: %w", c, err)
		}
		procs := "tasks"
		if version == 2 {
			procs = "cgroup.procs"
		}
		if err := os.WriteFile(filepath.Join(dir, procs), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			return fmt.Errorf("--cgroup %s: join %s: %w", c, dir, err)
		}
		if err := os.WriteFile(filepath.Join(dir, file), []byte(value), 0); err != nil {
			return fmt.Errorf("--cgroup %s: %w", c, err)
		}
	}
	return nil
}

func controllerMount(version int, controller string) (string, error) {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		switch {
		case version == 1 && f[2] == "cgroup":
			for _, o := range strings.Split(f[3], ",") {
				if o == controller {
					return f[1], nil
				}
			}
		case version == 2 && f[2] == "cgroup2":
			ctl, _ := os.ReadFile(filepath.Join(f[1], "cgroup.controllers")) //nolint:gosec // cgroup fs
			for _, c := range strings.Fields(string(ctl)) {
				if c == controller {
					return f[1], nil
				}
			}
		}
	}
	return "", fmt.Errorf("no cgroup v%d mount has the %s controller", version, controller)
}

// pivot makes root the process's root: a private mount namespace, root
// bind-mounted on itself, pivot_root, the old root detached and removed.
func pivot(root string) error {
	steps := []struct {
		what string
		do   func() error
	}{
		{"unshare the mount namespace", func() error { return unix.Unshare(unix.CLONE_NEWNS) }},
		{"make mounts private", func() error { return unix.Mount("", "/", "", unix.MS_PRIVATE|unix.MS_REC, "") }},
		{"bind the chroot", func() error { return unix.Mount(root, root, "", unix.MS_BIND|unix.MS_REC, "") }},
		{"enter the chroot", func() error { return unix.Chdir(root) }},
		{"make old_root", func() error { return unix.Mkdir("old_root", 0o700) }},
		{"pivot_root", func() error { return unix.PivotRoot(".", "old_root") }},
		{"detach the old root", func() error { return unix.Unmount("old_root", unix.MNT_DETACH) }},
		{"remove old_root", func() error { return unix.Rmdir("old_root") }},
		{"chroot", func() error { return unix.Chroot(".") }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fmt.Errorf("jail in %s: %s: %w", root, s.what, err)
		}
	}
	return nil
}
