package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/consolelog"
	"github.com/bangerdev/banger/internal/privdir"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer"
)

// launchJailed is launch through the jailer: the chroot is prepared (the
// kernel, initrd and disk linked in), the jailer runs with the console
// pipe as its stdout and stderr, clones Firecracker into a new pid
// namespace and exits; Firecracker's host pid is read from the jail's pid
// file and checked (uid, gid, root and --id) before the handle names it.
// Every path sent through the API is the chroot's; the handle records the
// host paths of the sockets and the jail, which Stop removes.
func (m *Monitor) launchJailed(ctx context.Context, spec vmm.Spec, verb string, setup func(ctx context.Context, c *Client, spec vmm.Spec) error) (h vmm.Handle, err error) {
	fail := func(format string, a ...any) error {
		return fmt.Errorf("%s firecracker for VM %q under the jailer: %w", verb, spec.Name, fmt.Errorf(format, a...))
	}
	bin, err := exec.LookPath(m.Binary)
	if err != nil {
		return vmm.Handle{}, fail("%w (is firecracker installed?)", err)
	}
	if bin, err = filepath.Abs(bin); err == nil {
		bin, err = filepath.EvalSymlinks(bin) // the jailer wants the canonical path
	}
	if err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	jbin, err := exec.LookPath(m.Jailer.Binary)
	if err != nil {
		return vmm.Handle{}, fail("%w (is the jailer installed? config firecracker_jailer.binary)", err)
	}
	fcArgs := append(append([]string{}, m.Args...), "--api-sock", jailer.APISocket)
	jc := *m.Jailer
	if spec.RunAs != nil { // the VM's own uid and gid (config id_range)
		jc.UID, jc.GID = spec.RunAs.UID, spec.RunAs.GID
	}
	inv, err := jc.Invocation(spec.VMID, bin, spec.MemoryMiB, fcArgs)
	if err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	for _, p := range []string{jailer.APISocket, jailer.AgentSocket} {
		// sun_path holds 108 bytes including the terminating NUL.
		if hp := inv.HostPath(p); len(hp) > 107 {
			return vmm.Handle{}, fail("socket path %s is longer than a Unix socket allows: use a shorter chroot base than %s", hp, inv.Base())
		}
	}
	if err := os.MkdirAll(spec.RuntimeDir, 0o700); err != nil {
		return vmm.Handle{}, fail("create runtime dir: %w", err)
	}
	if err := jailer.Prepare(inv, spec.Kernel, spec.Initrd, spec.Disk); err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	fifo := filepath.Join(spec.RuntimeDir, ConsoleFIFOName)
	var (
		proc    *vmm.Process
		fh      vmm.Handle
		started bool
	)
	defer func() {
		if err == nil {
			return
		}
		if proc != nil {
			proc.Kill()
		}
		if started {
			if serr := vmm.Signal(fh, syscall.SIGKILL); serr == nil {
				vmm.WaitGone(context.Background(), fh, 10*time.Second)
			}
		}
		// Whatever else runs inside the chroot is the jail's (a
		// Firecracker the checks refused): it goes too.
		jailer.KillInside(inv.ChrootDir())
		_ = consolelog.RemoveFIFO(fifo)
		consolelog.Drain(fifo, 2*time.Second)
		if rerr := jailer.Remove(inv); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()
	if err := consolelog.MakeFIFO(fifo); err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	out, err := consolelog.OpenFIFO(fifo, spec.ConsoleLog, spec.ConsoleLogMax)
	if err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	cmd := exec.Command(jbin, inv.Args()...) //nolint:gosec // the jailer is configuration; its arguments are validated against its contract
	cmd.Dir = "/"
	proc, err = vmm.StartDetachedOutput(cmd, out)
	_ = out.Close()
	if err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	sctx, cancel := context.WithTimeout(ctx, m.StartTimeout)
	defer cancel()
	select {
	case <-proc.Done():
	case <-sctx.Done():
		return vmm.Handle{}, fail("the jailer did not finish: %w", sctx.Err())
	}
	if xerr := proc.ExitErr(); xerr != nil {
		return vmm.Handle{}, fail("the jailer failed: %w (its message is in the console log %s)", xerr, spec.ConsoleLog)
	}
	proc = nil // reaped
	fh, err = identifyJailed(inv)
	if err != nil {
		return vmm.Handle{}, fail("%w", err)
	}
	started = true
	h = fh
	h.APISocket = inv.HostPath(jailer.APISocket)
	h.AgentSocket = inv.HostPath(jailer.AgentSocket)
	h.AgentTransport = vmm.TransportVsockUDS
	h.AgentCID = spec.VsockCID
	h.ConsoleFIFO, h.ConsoleLog, h.ConsoleLogMax = fifo, spec.ConsoleLog, spec.ConsoleLogMax
	h.Jail = inv.JailDir()
	gone := func() error {
		if alive, _ := vmm.Alive(fh); !alive {
			return errors.New("firecracker exited early")
		}
		return nil
	}
	if err := vmm.WaitForSocket(sctx, h.APISocket, gone); err != nil {
		return h, fail("API socket: %w", err)
	}
	jspec := spec
	jspec.Kernel = jailer.KernelPath
	if spec.Initrd != "" {
		jspec.Initrd = jailer.InitrdPath
	}
	jspec.AgentSocket = jailer.AgentSocket
	if err := setup(sctx, NewClient(h.APISocket), jspec); err != nil {
		return h, fail("%w", err)
	}
	return h, nil
}

// identifyJailed reads Firecracker's host pid from the jail's pid file
// (root's file, opened without following links) and checks that the
// process is the jailed Firecracker: its uid and gid are the jail's, its
// root is the chroot, and its command line carries the jail's --id.
func identifyJailed(inv jailer.Invocation) (vmm.Handle, error) {
	b, err := readRootFile(inv.PIDFile(), 32)
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("jailer pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return vmm.Handle{}, fmt.Errorf("jailer pid file %s: %q is not a pid", inv.PIDFile(), b)
	}
	h, err := vmm.Identify(pid)
	if err != nil {
		return vmm.Handle{}, err
	}
	uid, gid, err := procIDs(pid)
	if err != nil {
		return vmm.Handle{}, err
	}
	if uid != inv.UID || gid != inv.GID {
		return vmm.Handle{}, fmt.Errorf("pid %d runs as uid %d gid %d, not the jail's %d:%d", pid, uid, gid, inv.UID, inv.GID)
	}
	if !jailer.RootIs(pid, inv.ChrootDir()) {
		return vmm.Handle{}, fmt.Errorf("pid %d is not inside the chroot %s", pid, inv.ChrootDir())
	}
	if len(h.Cmdline) < 2 || h.Cmdline[1] != "--id="+inv.ID {
		return vmm.Handle{}, fmt.Errorf("pid %d is not the jail's firecracker: %q", pid, h.Cmdline)
	}
	return h, nil
}

// readRootFile reads a small regular file of the daemon's euid, opened
// without following a link or blocking (the jail user owns the dir it is
// in, so it could have put a link, a FIFO or its own file there).
func readRootFile(path string, max int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || !ok || int(st.Uid) != os.Geteuid() || fi.Size() > max {
		return nil, fmt.Errorf("%s: not a small regular file of uid %d (%v, %d bytes): %w", path, os.Geteuid(), fi.Mode().Type(), fi.Size(), privdir.ErrUnsafe)
	}
	return io.ReadAll(io.LimitReader(f, max))
}

// procIDs returns the real uid and gid of pid from /proc/<pid>/status.
func procIDs(pid int) (uid, gid uint32, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, 0, err
	}
	var got int
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		f := strings.Fields(v)
		if (k != "Uid" && k != "Gid") || len(f) == 0 {
			continue
		}
		n, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil {
			return 0, 0, fmt.Errorf("status of pid %d: %s: %w", pid, line, err)
		}
		if k == "Uid" {
			uid = uint32(n)
		} else {
			gid = uint32(n)
		}
		got++
	}
	if got != 2 {
		return 0, 0, fmt.Errorf("status of pid %d: no Uid or Gid line", pid)
	}
	return uid, gid, nil
}

// removeJail removes the jail h names once no process runs in it (a
// handle whose pid was reused must not take a live VM's jail). The jail
// dir must be under the configured chroot base.
func (m *Monitor) removeJail(h vmm.Handle) error {
	if m.Jailer == nil {
		return fmt.Errorf("the VM ran under the jailer (jail %s), but no jailer is configured (config firecracker_jailer): %w", h.Jail, jailer.ErrNotBangers)
	}
	inv, err := jailer.FromJailDir(m.Jailer.ChrootBase, h.Jail)
	if err != nil {
		return err
	}
	if jailer.InUse(inv.ChrootDir()) {
		return nil
	}
	return jailer.Remove(inv)
}

// ReleaseJail removes VM id's jail under the configured chroot base
// whatever its record says, for a daemon releasing a VM: every process
// running inside the chroot (a monitor whose start died before its pid was
// recorded) is killed first, then Remove checks banger's marker. Nothing
// when no jailer is configured.
func (m *Monitor) ReleaseJail(id string) error {
	if m.Jailer == nil {
		return nil
	}
	bin, err := exec.LookPath(m.Binary)
	if err == nil {
		bin, err = filepath.Abs(bin)
	}
	if err == nil {
		bin, err = filepath.EvalSymlinks(bin)
	}
	if err != nil {
		bin = m.Binary // the jail dir is named by the file name only
	}
	if !jailer.ValidID(id) {
		return fmt.Errorf("release jail of VM %q: %w", id, jailer.ErrContract)
	}
	inv := jailer.Invocation{ID: id, ExecFile: "/" + filepath.Base(bin), ChrootBase: m.Jailer.ChrootBase, ParentCgroup: jailer.ParentCgroup}
	jailer.KillInside(inv.ChrootDir())
	return jailer.Remove(inv)
}
