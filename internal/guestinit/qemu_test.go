package guestinit_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

// These tests boot banger's guest program on real Debian content under
// QEMU TCG, without the daemon: Debian's cloud kernel with the initramfs
// banger generates (its /init is the guest program), and an ext4 made from
// a test image with banger's guest files injected as image pull does.

var fixtures struct {
	once   sync.Once
	dir    string
	guest  string
	kernel model.Kernel
	err    error
}

// guestKernel builds the guest program and banger-init, and imports the
// cached Debian cloud kernel with an initramfs around banger-init, once.
func guestKernel(t *testing.T) (guest string, k model.Kernel) {
	t.Helper()
	testutil.RequiresRoot(t)
	testutil.RequiresQEMU(t)
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "go", "mkfs.ext4", "debugfs", "e2fsck", "depmod", "tar")
	deb := testutil.DebianKernelDeb(t)
	fixtures.once.Do(func() {
		fixtures.dir, fixtures.err = os.MkdirTemp("", "banger-guestinit-test-")
		if fixtures.err != nil {
			return
		}
		fixtures.guest = filepath.Join(fixtures.dir, "banger-vsock-agent")
		initBin := filepath.Join(fixtures.dir, "banger-init")
		for out, pkg := range map[string]string{fixtures.guest: "cmd/banger-vsock-agent", initBin: "cmd/banger-init"} {
			build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w -X main.version=qemu-test", "-o", out,
				"github.com/bangerdev/banger/"+pkg)
			build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
			if b, err := build.CombinedOutput(); err != nil {
				fixtures.err = fmt.Errorf("build %s: %w\n%s", pkg, err, b)
				return
			}
		}
		fixtures.kernel, fixtures.err = kernels.ImportDeb(context.Background(), filepath.Join(fixtures.dir, "kernel"), "debian-cloud", deb,
			kernels.DebOptions{InitBinary: initBin})
	})
	if fixtures.err != nil {
		t.Fatal(fixtures.err)
	}
	return fixtures.guest, fixtures.kernel
}

func TestMain(m *testing.M) {
	code := m.Run()
	if fixtures.dir != "" {
		_ = os.RemoveAll(fixtures.dir)
	}
	os.Exit(code)
}

// imageDisk unpacks tarball and makes an ext4 of it with banger's guest
// files and cfg injected, and, when k is set, the kernel's power-button
// modules in its lib/modules tree (image pull stages the whole tree).
func imageDisk(t *testing.T, tarball, guest string, cfg *guestabi.ImageConfig, size string, k *model.Kernel) string {
	t.Helper()
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("tar", "-xpf", tarball, "--numeric-owner", "-C", tree).CombinedOutput(); err != nil {
		t.Fatalf("unpack %s: %v\n%s", tarball, err, out)
	}
	if k != nil {
		for _, m := range []string{"kernel/drivers/input/evdev.ko", "kernel/drivers/acpi/button.ko"} {
			dst := filepath.Join(tree, "lib/modules", k.Version, m)
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("cp", filepath.Join(k.Modules.Path, m), dst).CombinedOutput(); err != nil {
				t.Fatalf("copy module %s: %v\n%s", m, err, out)
			}
		}
	}
	img := filepath.Join(dir, "rootfs.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, img, size).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	_ = os.RemoveAll(tree)
	if err := imagepull.InjectGuestAgents(context.Background(), img, imagepull.GuestAssets{AgentBinary: guest, Config: cfg}); err != nil {
		t.Fatalf("InjectGuestAgents: %v", err)
	}
	return img
}

// vm is one QEMU guest.
type vm struct {
	t       *testing.T
	console string
	sock    string
	qmp     string
	started time.Time
	done    chan struct{}
	exited  time.Time
	cmd     *exec.Cmd
	out     bytes.Buffer
}

// bootOpts says how to boot.
type bootOpts struct {
	disk    string
	cmdline guestabi.Cmdline
	tap     string // tap device QEMU creates in the current namespace; "" for no NIC
	mac     string
}

func boot(t *testing.T, k model.Kernel, o bootOpts) *vm {
	t.Helper()
	dir := t.TempDir()
	v := &vm{t: t, console: filepath.Join(dir, "console.log"), sock: filepath.Join(dir, "agent.sock"), qmp: filepath.Join(dir, "qmp.sock"), done: make(chan struct{})}
	c := o.cmdline
	c.Kernel = append([]string{"console=ttyS0", "panic=-1", "loglevel=4", "net.ifnames=0"}, c.Kernel...)
	c.Root, c.ReadWrite = "/dev/vda", true
	line, err := c.Encode()
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"-M", "pc", "-accel", "tcg", "-m", "512", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", k.Kernel.Path, "-initrd", k.Initrd.Path, "-append", line,
		"-serial", "file:" + v.console, "-qmp", "unix:" + v.qmp + ",server=on,wait=off",
		"-drive", "file=" + o.disk + ",if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0",
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=agent,path=" + v.sock + ",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name=" + guestabi.AgentSerialPort}
	if o.tap != "" {
		args = append(args, "-netdev", "tap,id=n0,ifname="+o.tap+",script=no,downscript=no",
			"-device", "virtio-net-pci,netdev=n0,mac="+o.mac)
	}
	v.cmd = exec.Command("qemu-system-x86_64", args...)
	v.cmd.Stdout, v.cmd.Stderr = &v.out, &v.out
	v.started = time.Now()
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() { _ = v.cmd.Wait(); v.exited = time.Now(); close(v.done) }()
	t.Cleanup(func() {
		select {
		case <-v.done:
		default:
			_ = v.cmd.Process.Kill()
			<-v.done
		}
		if t.Failed() || os.Getenv("BANGER_TEST_CONSOLE") != "" {
			t.Logf("qemu output: %s\nguest console (tail):\n%s", v.out.String(), tail(v.consoleText(), 60))
		}
	})
	return v
}

func (v *vm) consoleText() string {
	b, _ := os.ReadFile(v.console)
	return string(b)
}

func (v *vm) dial(ctx context.Context) (*agent.Client, error) {
	select {
	case <-v.done:
		return nil, fmt.Errorf("qemu exited: %s", v.out.String())
	default:
	}
	return agent.Dial(ctx, agent.TransportVirtioSerial, v.sock)
}

// healthy waits for the agent and returns the time from QEMU's start.
func (v *vm) healthy() (*agent.Health, time.Duration) {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	h, err := agent.WaitHealthy(ctx, v.dial, 100*time.Millisecond, nil)
	if err != nil {
		v.t.Fatalf("agent never healthy: %v", err)
	}
	return h, time.Since(v.started)
}

// waitConsole waits for the console to hold want.
func (v *vm) waitConsole(want string, within time.Duration) {
	v.t.Helper()
	deadline := time.Now().Add(within)
	for !strings.Contains(v.consoleText(), want) {
		if time.Now().After(deadline) {
			v.t.Fatalf("console never showed %q within %s", want, within)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// status asks the agent for its status.
func (v *vm) status() *agent.Status {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := v.dial(ctx)
	if err != nil {
		v.t.Fatal(err)
	}
	defer c.Close()
	st, err := c.Status(ctx)
	if err != nil {
		v.t.Fatal(err)
	}
	return st
}

// stop asks the agent to shut the guest down and returns how long QEMU
// took to exit by itself.
func (v *vm) stop() time.Duration {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := v.dial(ctx)
	if err != nil {
		v.t.Fatal(err)
	}
	start := time.Now()
	method, err := c.Shutdown(ctx)
	_ = c.Close()
	if err != nil {
		v.t.Fatalf("agent shutdown: %v", err)
	}
	if method != "banger-init" {
		v.t.Errorf("shutdown method %q, want banger-init (banger's PID 1 runs the guest)", method)
	}
	select {
	case <-v.done:
	case <-time.After(30 * time.Second):
		v.t.Fatalf("the guest did not power off within 30s of the shutdown request")
	}
	return v.exited.Sub(start)
}

// powerdown presses the ACPI power button (QMP system_powerdown) and
// returns how long QEMU took to exit by itself.
func (v *vm) powerdown() time.Duration {
	v.t.Helper()
	c, err := net.Dial("unix", v.qmp)
	if err != nil {
		v.t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	for _, cmd := range []string{`{"execute":"qmp_capabilities"}`, `{"execute":"system_powerdown"}`} {
		if _, err := c.Write([]byte(cmd + "\n")); err != nil {
			v.t.Fatal(err)
		}
	}
	select {
	case <-v.done:
	case <-time.After(30 * time.Second):
		v.t.Fatalf("the guest did not power off within 30s of the ACPI power button")
	}
	return v.exited.Sub(start)
}

// fsckClean checks the ext4 with e2fsck -fn.
func fsckClean(t *testing.T, img string) {
	t.Helper()
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn after shutdown: %v\n%s", err, out)
	}
}

// catFile reads a file out of the ext4 with debugfs.
func catFile(t *testing.T, img, p string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", "cat "+p, img).Output()
	if err != nil {
		t.Fatalf("debugfs cat %s: %v", p, err)
	}
	return string(out)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// busyboxMain is the busybox image's main process: it prints who and
// where it runs, leaves an orphan to be reaped, pings the gateway, and
// exits 3.
const busyboxMain = `echo "MAIN uid=$(id -u) gid=$(id -g) cwd=$(pwd) GREETING=$GREETING";
(sleep 0.3 &);
sleep 2;
z=$(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null);
echo "ZOMBIES=[$z]";
i=0; while [ $i -lt 20 ]; do if ping -c1 -W1 10.99.0.1 >/dev/null 2>&1; then echo PING-OK; break; fi; i=$((i+1)); done;
exit 3`

// TestBusyboxBoots boots the busybox image on banger's PID 1 with a NIC in
// a bridge of a test network namespace: agent-ready, the main process's
// env, user, working dir, output and exit status, an orphan reaped, the
// address, a ping of the gateway, first boot skipped (no package manager),
// and a clean shutdown.
func TestBusyboxBoots(t *testing.T) {
	guest, k := guestKernel(t)
	testutil.InNetNS(t)
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "initbr0"}}
	if err := netlink.LinkAdd(br); err != nil {
		t.Fatal(err)
	}
	addr, _ := netlink.ParseAddr("10.99.0.1/24")
	if err := netlink.AddrAdd(br, addr); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
	cfg := &guestabi.ImageConfig{Cmd: []string{"sh", "-c", busyboxMain}, Env: []string{"GREETING=hello there"}, WorkingDir: "/tmp"}
	disk := imageDisk(t, testutil.BusyboxRootfsTar(t), guest, cfg, "64M", nil)
	c, err := guestabi.Parse("banger.ip=10.99.0.2/24 banger.gw=10.99.0.1 banger.dns=10.99.0.1 banger.hostname=bb-vm banger.mac=52:54:00:12:34:56")
	if err != nil {
		t.Fatal(err)
	}
	v := boot(t, k, bootOpts{disk: disk, cmdline: c, tap: "inittap0", mac: "52:54:00:12:34:56"})
	// QEMU made the tap; put it in the bridge.
	deadline := time.Now().Add(20 * time.Second)
	for {
		tap, err := netlink.LinkByName("inittap0")
		if err == nil {
			if err := netlink.LinkSetMaster(tap, br); err != nil {
				t.Fatal(err)
			}
			if err := netlink.LinkSetUp(tap); err != nil {
				t.Fatal(err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu never made its tap: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	h, ready := v.healthy()
	t.Logf("busybox: agent ready %s after QEMU started", ready.Round(10*time.Millisecond))
	if h.Hostname != "bb-vm" {
		t.Errorf("hostname %q, want bb-vm", h.Hostname)
	}
	v.waitConsole("main process", 30*time.Second)
	v.waitConsole("ended (exit status 3)", 60*time.Second)
	console := v.consoleText()
	for _, want := range []string{"MAIN uid=0 gid=0 cwd=/tmp GREETING=hello there", "ZOMBIES=[]", "PING-OK"} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q", want)
		}
	}
	st := v.status()
	if st.FirstBoot != guestabi.FirstBootSkipped || !strings.Contains(strings.Join(st.FirstBootLog, "\n"), "no package manager") {
		t.Errorf("first boot %q, log %q; want skipped: no package manager", st.FirstBoot, st.FirstBootLog)
	}
	found := false
	for _, a := range st.Addresses {
		found = found || a.CIDR == "10.99.0.2/24"
	}
	if !found {
		t.Errorf("addresses %+v lack 10.99.0.2/24", st.Addresses)
	}
	took := v.stop()
	t.Logf("busybox: powered off %s after the shutdown request", took.Round(10*time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("shutdown took %s, want under 5s", took)
	}
	fsckClean(t, disk)
	if log := catFile(t, disk, guestabi.MainLog); !strings.Contains(log, "MAIN uid=0") || !strings.Contains(log, "PING-OK") {
		t.Errorf("%s = %q, want the main process's output", guestabi.MainLog, log)
	}
	if log := catFile(t, disk, guestabi.InitLog); !strings.Contains(log, "powering off") {
		t.Errorf("%s lacks the shutdown; tail:\n%s", guestabi.InitLog, tail(log, 10))
	}
}

// TestScratchBoots boots an image with one static binary and no shell,
// libc or /etc, as a numeric user, with its network cut (banger.ip set, no
// NIC): the VM comes up all the same.
func TestScratchBoots(t *testing.T) {
	guest, k := guestKernel(t)
	cfg := &guestabi.ImageConfig{Entrypoint: []string{"/app"}, Cmd: []string{"x"}, Env: []string{"GREETING=hi", "EXIT=0"}, User: "1234:5678", WorkingDir: "/work"}
	disk := imageDisk(t, testutil.ScratchRootfsTar(t), guest, cfg, "32M", &k)
	c := guestabi.Cmdline{Hostname: "scratch-vm", Main: guestabi.MainOverride{Cmd: []string{"a", "b"}, Env: []string{"EXIT=4"}}}
	c.Network.Address = netip.MustParsePrefix("10.99.1.2/24")
	v := boot(t, k, bootOpts{disk: disk, cmdline: c})
	_, ready := v.healthy()
	t.Logf("scratch: agent ready %s after QEMU started", ready.Round(10*time.Millisecond))
	v.waitConsole("ended (exit status 4)", 60*time.Second)
	console := v.consoleText()
	for _, want := range []string{"scratch-main uid=1234 gid=5678 cwd=/work GREETING=hi args=a,b", "banger-init: network: no Ethernet interface"} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q", want)
		}
	}
	// The power button (QEMU's system_powerdown) shuts it down cleanly.
	time.Sleep(time.Second) // the button's module loads in the background
	if took := v.powerdown(); took > 5*time.Second {
		t.Errorf("shutdown on the ACPI power button took %s, want under 5s", took)
	}
	if !strings.Contains(v.consoleText(), "shutting down: ACPI power button") {
		t.Errorf("console does not show the power-button shutdown")
	}
	fsckClean(t, disk)
}

// TestSystemdImageNetwork boots the systemd Debian test image on its own
// init: banger-network.service (the guest program's network mode) gives
// the NIC its address from the kernel command line, and the agent reports
// it and the image's init.
func TestSystemdImageNetwork(t *testing.T) {
	guest, k := guestKernel(t)
	testutil.InNetNS(t)
	disk := imageDisk(t, testutil.DebianRootfsTar(t, "", nil), guest, nil, "1G", nil)
	c, err := guestabi.Parse("banger.ip=10.99.2.2/24 banger.gw=10.99.2.1 banger.hostname=sd-vm banger.mac=52:54:00:12:34:57")
	if err != nil {
		t.Fatal(err)
	}
	v := boot(t, k, bootOpts{disk: disk, cmdline: c, tap: "inittap1", mac: "52:54:00:12:34:57"})
	h, ready := v.healthy()
	t.Logf("systemd image: agent ready %s after QEMU started", ready.Round(10*time.Millisecond))
	deadline := time.Now().Add(60 * time.Second)
	for {
		st := v.status()
		found := false
		for _, a := range st.Addresses {
			found = found || a.CIDR == "10.99.2.2/24"
		}
		if found && st.Init == guestabi.InitImage {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status %+v: want 10.99.2.2/24 on the NIC and the image's init", st)
		}
		time.Sleep(time.Second)
	}
	if h2, _ := v.healthy(); h2.Hostname != "sd-vm" {
		t.Errorf("hostname %q (first %q), want sd-vm", h2.Hostname, h.Hostname)
	}
	if strings.Contains(v.consoleText(), "banger-network:") && strings.Contains(v.consoleText(), "banger-network: network:") {
		t.Errorf("banger-network failed:\n%s", tail(v.consoleText(), 20))
	}
}
