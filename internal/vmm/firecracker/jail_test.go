package firecracker_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

// The jailed Firecracker runs as this uid and gid (nobody, nogroup).
const jailUID, jailGID = 65534, 65534

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// fakeBinaries builds the fake Firecracker and the fake jailer, static (the
// fake Firecracker runs alone inside the chroot), once per test binary.
func fakeBinaries(t *testing.T) (fc, jl string) {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "banger-fake-jail-bin-")
		if binErr != nil {
			return
		}
		_, file, _, _ := runtime.Caller(0)
		for _, c := range []string{"banger-fake-firecracker", "banger-fake-jailer"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, c), "./cmd/"+c)
			cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..", "..")
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				binErr = fmt.Errorf("go build %s: %w\n%s", c, err, out)
				return
			}
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return filepath.Join(binDir, "banger-fake-firecracker"), filepath.Join(binDir, "banger-fake-jailer")
}

// cgroupVersion is the hierarchy the host's memory controller is in.
func cgroupVersion() int {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return 2
	}
	return 1
}

// jailedMonitor returns monitors that start the fake Firecracker through
// the fake jailer, with the chroot base in base.
func jailedMonitor(t *testing.T, base string) func() vmm.Monitor {
	fc, jl := fakeBinaries(t)
	return func() vmm.Monitor {
		m := firecracker.New()
		m.Binary = fc
		m.Args = []string{"--agent-echo"}
		m.TermWait = 2 * time.Second
		m.Jailer = &jailer.Config{Binary: jl, UID: jailUID, GID: jailGID, ChrootBase: base,
			CgroupVersion: cgroupVersion(), Cgroups: []string{"pids.max=64"}}
		return m
	}
}

// jailedSpec is fakeSpec with a VM id of the jailer's form.
func jailedSpec(t *testing.T) vmm.Spec {
	spec := fakeSpec(t)
	spec.VMID = fmt.Sprintf("0123456789abcdef%08x", time.Now().UnixNano()&0xffffffff)
	return spec
}

// shortDir is a fresh dir with a short path (a socket path in the chroot
// must fit sun_path's 108 bytes, and the test's TMPDIR may be long), on
// /tmp's file system, which holds the jail base and the specs' disks.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", "bj")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

// jailedSpecIn is jailedSpec with its files in dir.
func jailedSpecIn(t *testing.T, dir string) vmm.Spec {
	spec := jailedSpec(t)
	vm, err := os.MkdirTemp(dir, "vm")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []*string{&spec.Kernel, &spec.Disk} {
		p := filepath.Join(vm, filepath.Base(*f))
		if err := os.WriteFile(p, []byte("not really"), 0o600); err != nil {
			t.Fatal(err)
		}
		*f = p
	}
	return spec
}

// TestJailedConformance runs the shared suite with Firecracker started
// through the jailer (root: the jailer pivots, mknods and drops to a uid).
func TestJailedConformance(t *testing.T) {
	testutil.RequiresRoot(t)
	short := shortDir(t)
	base := filepath.Join(short, "jail")
	newMonitor := jailedMonitor(t, base)
	vmmtest.RunConfig(t, vmmtest.Config{
		New:          newMonitor,
		Spec:         func(t *testing.T) vmm.Spec { return jailedSpecIn(t, short) },
		WantGraceful: true,
		Graceful:     5 * time.Second,
		NoSnapshot:   "snapshots of jailed Firecracker VMs are not built yet",
	})
	assertEmptyJailBase(t, base)
}

// TestJailedMonitor starts a Firecracker VM through the jailer and checks
// what the jailer's contract promises: the monitor runs as the configured
// uid and gid with no groups and no capabilities, inside the chroot, as
// pid 1 of its own pid namespace, in the VM's cgroups with the limits set;
// the pid file and the API socket are where the contract puts them, the
// device nodes are the jail user's; every path sent through the API
// resolved inside the chroot (the fake checks them there); the agent and
// the capped console work through it. Stop leaves nothing: no process, no
// jail dir, no cgroup, no console pipe, and the VM's disk is intact and
// root's again.
func TestJailedMonitor(t *testing.T) {
	testutil.RequiresRoot(t)
	dir := shortDir(t)
	base := filepath.Join(dir, "jail")
	m := jailedMonitor(t, base)().(*firecracker.Monitor)
	spec := jailedSpecIn(t, dir)
	h, err := m.Start(t.Context(), spec)
	if err != nil {
		b, _ := os.ReadFile(spec.ConsoleLog)
		t.Fatalf("Start: %v\nconsole:\n%s", err, b)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })
	fc, _ := fakeBinaries(t)
	name := filepath.Base(fc)
	jail := filepath.Join(base, name, spec.VMID)
	root := filepath.Join(jail, "root")
	if h.Jail != jail {
		t.Errorf("handle jail = %q, want %q", h.Jail, jail)
	}

	// Identity: uid, gid, groups, capabilities, root, pid namespace.
	status := procStatus(t, h.PID)
	for k, want := range map[string]string{
		"Uid": "65534\t65534\t65534\t65534", "Gid": "65534\t65534\t65534\t65534",
		"Groups": "", "CapEff": "0000000000000000", "CapPrm": "0000000000000000",
	} {
		if got := status[k]; got != want {
			t.Errorf("/proc/%d/status %s = %q, want %q", h.PID, k, got, want)
		}
	}
	if ns := strings.Fields(status["NSpid"]); len(ns) != 2 || ns[0] != strconv.Itoa(h.PID) || ns[1] != "1" {
		t.Errorf("NSpid = %q, want the host pid %d and 1 (init of a new pid namespace)", status["NSpid"], h.PID)
	}
	var st, rt syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/root/", h.PID), &st); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Stat(root, &rt); err != nil {
		t.Fatal(err)
	}
	if st.Dev != rt.Dev || st.Ino != rt.Ino {
		t.Errorf("monitor's root is not the chroot %s", root)
	}
	if h.Cmdline[0] != "/"+name || h.Cmdline[1] != "--id="+spec.VMID || !strings.HasPrefix(h.Cmdline[2], "--start-time-us=") {
		t.Errorf("monitor argv = %q, want /%s --id=%s --start-time-us=... (the jailer's exec)", h.Cmdline, name, spec.VMID)
	}

	// Layout: pid file, socket, device nodes, the copied binary.
	if b, err := os.ReadFile(filepath.Join(root, name+".pid")); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(h.PID) {
		t.Errorf("pid file %s = %q, %v; want %d", filepath.Join(root, name+".pid"), b, err, h.PID)
	}
	if h.APISocket != filepath.Join(root, "run/fc.sock") || !isSock(h.APISocket) {
		t.Errorf("API socket %q: want the socket %s", h.APISocket, filepath.Join(root, "run/fc.sock"))
	}
	for node, dev := range map[string][2]uint32{"dev/kvm": {10, 232}, "dev/net/tun": {10, 200}} {
		var s syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(root, node), &s); err != nil {
			t.Errorf("%s: %v", node, err)
			continue
		}
		if s.Mode&syscall.S_IFMT != syscall.S_IFCHR || major(s.Rdev) != dev[0] || minor(s.Rdev) != dev[1] || s.Uid != jailUID || s.Gid != jailGID {
			t.Errorf("%s: mode %o rdev %d:%d owner %d:%d; want a character device %d:%d of %d:%d",
				node, s.Mode, major(s.Rdev), minor(s.Rdev), s.Uid, s.Gid, dev[0], dev[1], jailUID, jailGID)
		}
	}
	var ds syscall.Stat_t
	if err := syscall.Stat(filepath.Join(root, "rootfs.disk"), &ds); err != nil || ds.Uid != jailUID {
		t.Errorf("disk in the chroot: %v, owner %d; want the VM's disk, owned by the jail user", err, ds.Uid)
	}

	// cgroups: the monitor is in <mount>/banger/<id> of the memory and
	// pids controllers, with the limits written.
	cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", h.PID))
	want := "/" + jailer.ParentCgroup + "/" + spec.VMID
	if !strings.Contains(string(cg), want) {
		t.Errorf("/proc/%d/cgroup lacks %s:\n%s", h.PID, want, cg)
	}
	cgDirs := cgroupDirs(t, spec.VMID)
	if len(cgDirs) == 0 {
		t.Error("no cgroup dir of the VM under any cgroup mount")
	}
	memFile, memWant := "memory.limit_in_bytes", strconv.Itoa((spec.MemoryMiB+128)<<20)
	if cgroupVersion() == 2 {
		memFile = "memory.max"
	}
	for _, d := range cgDirs {
		for f, w := range map[string]string{memFile: memWant, "pids.max": "64"} {
			if b, err := os.ReadFile(filepath.Join(d, f)); err == nil && strings.TrimSpace(string(b)) != w {
				t.Errorf("%s/%s = %q, want %s", d, f, b, w)
			}
		}
	}

	// The agent channel works through the chroot's socket.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	conn, err := agent.ConnectVsockUDS(ctx, h.AgentSocket, agent.DefaultPort)
	if err != nil {
		t.Fatalf("agent channel %s: %v", h.AgentSocket, err)
	}
	_, _ = conn.Write([]byte("ping\n"))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "ping\n" {
		t.Errorf("echo through the jailed vsock = %q, %v", buf, err)
	}
	conn.Close()

	how, err := m.Stop(t.Context(), h, 5*time.Second)
	if err != nil || how != vmm.StoppedGraceful {
		t.Fatalf("Stop = %q, %v; want graceful", how, err)
	}
	if b, _ := os.ReadFile(spec.ConsoleLog); !strings.Contains(string(b), "banger fake guest: booted") {
		t.Errorf("console log lacks the guest's boot:\n%s", b)
	}
	assertEmptyJailBase(t, base)
	if d := cgroupDirs(t, spec.VMID); len(d) > 0 {
		t.Errorf("cgroups left after Stop: %v", d)
	}
	for _, mnt := range allCgroupMounts(t) {
		if _, err := os.Stat(filepath.Join(mnt, jailer.ParentCgroup)); err == nil {
			t.Errorf("parent cgroup %s left after the last VM", filepath.Join(mnt, jailer.ParentCgroup))
		}
	}
	if _, err := os.Lstat(h.ConsoleFIFO); err == nil {
		t.Errorf("console pipe %s left", h.ConsoleFIFO)
	}
	if err := syscall.Stat(spec.Disk, &ds); err != nil || ds.Uid != 0 || ds.Nlink != 1 {
		t.Errorf("the VM's disk after Stop: %v, owner %d, %d links; want root's, 1 link", err, ds.Uid, ds.Nlink)
	}
	if b, err := os.ReadFile(spec.Disk); err != nil || string(b) != "not really" {
		t.Errorf("the VM's disk after Stop = %q, %v", b, err)
	}
}

// TestJailerRefusesBadArgs runs the fake jailer (no root needed: it parses
// before anything else) with command lines the contract refuses.
func TestJailerRefusesBadArgs(t *testing.T) {
	_, jl := fakeBinaries(t)
	fc := "/usr/bin/firecracker"
	good := []string{"--id", "vm-1", "--exec-file", fc, "--uid", "123", "--gid", "100"}
	for name, args := range map[string][]string{
		"id too long":          {"--id", strings.Repeat("a", 65), "--exec-file", fc, "--uid", "1", "--gid", "1"},
		"id with underscore":   {"--id", "vm_1", "--exec-file", fc, "--uid", "1", "--gid", "1"},
		"relative exec file":   {"--id", "vm", "--exec-file", "firecracker", "--uid", "1", "--gid", "1"},
		"exec file name":       {"--id", "vm", "--exec-file", "/usr/bin/qemu", "--uid", "1", "--gid", "1"},
		"no uid":               {"--id", "vm", "--exec-file", fc, "--gid", "1"},
		"uid not a number":     {"--id", "vm", "--exec-file", fc, "--uid", "root", "--gid", "1"},
		"unknown flag":         append(append([]string{}, good...), "--node", "0"),
		"cgroup version 3":     append(append([]string{}, good...), "--cgroup-version", "3"),
		"cgroup without =":     append(append([]string{}, good...), "--cgroup", "memory.max"),
		"relative chroot":      append(append([]string{}, good...), "--chroot-base-dir", "srv/jailer"),
		"parent cgroup ..":     append(append([]string{}, good...), "--parent-cgroup", "../x"),
		"bad resource limit":   append(append([]string{}, good...), "--resource-limit", "cpu=1"),
		"id twice":             append(append([]string{}, good...), "--id", "vm-2"),
		"--id for firecracker": append(append([]string{}, good...), "--", "--id", "x"),
	} {
		out, err := exec.Command(jl, args...).CombinedOutput()
		var xe *exec.ExitError
		if !asExit(err, &xe) || xe.ExitCode() != 2 || !strings.Contains(string(out), "contract") {
			t.Errorf("%s: %q: exit %v, %s; want status 2 and the contract named", name, args, err, out)
		}
	}
}

func asExit(err error, target **exec.ExitError) bool {
	e, ok := err.(*exec.ExitError) //nolint:errorlint // exec returns it unwrapped
	*target = e
	return ok
}

func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

func allCgroupMounts(t *testing.T) []string {
	t.Helper()
	var all []string
	for _, v := range []int{1, 2} {
		m, err := jailer.CgroupMounts(v)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, m...)
	}
	return all
}

func cgroupDirs(t *testing.T, id string) []string {
	var out []string
	for _, mnt := range allCgroupMounts(t) {
		d := filepath.Join(mnt, jailer.ParentCgroup, id)
		if _, err := os.Stat(d); err == nil {
			out = append(out, d)
		}
	}
	return out
}

// assertEmptyJailBase checks that no jail is left under base.
func assertEmptyJailBase(t *testing.T, base string) {
	t.Helper()
	_ = filepath.Walk(base, func(p string, fi os.FileInfo, err error) error {
		if err == nil && p != base && filepath.Dir(p) != base {
			t.Errorf("left in the jail base: %s", p)
		}
		return nil
	})
}

func isSock(p string) bool {
	fi, err := os.Lstat(p)
	return err == nil && fi.Mode().Type() == os.ModeSocket
}

func major(d uint64) uint32 { return uint32((d >> 8) & 0xfff) }
func minor(d uint64) uint32 { return uint32((d & 0xff) | ((d >> 12) & 0xfff00)) }
