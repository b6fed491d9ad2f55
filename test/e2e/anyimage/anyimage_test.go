// Package anyimage holds the end-to-end tests of images without systemd
// (issue 11) on real QEMU TCG guests through the daemon: busybox, scratch
// and Debian minbase boot on banger's PID 1, and the systemd Debian image
// boots with --init banger. One daemon, kernel and registry serve every
// subtest; each image boots once.
package anyimage

import (
	"context"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// busyboxMain is the busybox image's Cmd: who and where it runs, the
// guest's hardware random source (the host's virtio-rng), an orphan
// left for PID 1 to reap, a ping of the gateway (read from the kernel
// command line), exit 3.
const busyboxMain = `echo "MAIN uid=$(id -u) gid=$(id -g) cwd=$(pwd) GREETING=$GREETING";
echo "RNG=$(cat /sys/class/misc/hw_random/rng_current)";
(sleep 0.3 &);
sleep 2;
z=$(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null);
echo "ZOMBIES=[$z]";
gw=$(sed -n 's/.*banger\.gw=\([0-9.]*\).*/\1/p' /proc/cmdline);
i=0; while [ $i -lt 20 ]; do if ping -c1 -W1 "$gw" >/dev/null 2>&1; then echo "PING-OK $gw"; break; fi; i=$((i+1)); done;
exit 3`

// images pushes and pulls the four test images into one environment:
// busybox (the Env's own image), scratch, minbase and the systemd Debian
// image as "debian". It returns the Env and what pulling scratch printed.
func images(t *testing.T, ctx context.Context) (*e2etest.Env, string) {
	t.Helper()
	busybox := e2etest.LayoutOf(t, testutil.BusyboxRootfsTar(t), v1.Config{
		Cmd: []string{"sh", "-c", busyboxMain}, Env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=from the image"}, WorkingDir: "/tmp",
	})
	scratch := e2etest.LayoutOf(t, testutil.ScratchRootfsTar(t), v1.Config{
		Entrypoint: []string{"/app"}, Cmd: []string{"x"}, Env: []string{"GREETING=hi", "EXIT=5"}, User: "1234:5678", WorkingDir: "/work",
		ExposedPorts: map[string]struct{}{"8080/tcp": {}},
	})
	minbase := e2etest.LayoutOf(t, testutil.DebianMinbaseTar(t), v1.Config{
		Cmd: []string{"sh", "-c", `echo "MAIN $(id -un) $(pwd)"; exit 7`}, User: "nobody", WorkingDir: "/var/tmp",
	})
	systemd := e2etest.DebianLayout(t, "", nil)

	e := e2etest.SetupWith(t, nil, "busybox", func(ns *e2etest.NetNS, reg *e2etest.Registry) string {
		return reg.Push(t, ns, busybox, "banger/busybox")
	})
	pull := func(layout, repo, name string) string {
		ref := e.Reg.Push(t, e.NS, layout, repo)
		return e.D.MustCLI(ctx, "image", "pull", ref, "--name", name, "--kernel-ref", "deb-cloud")
	}
	scratchPull := pull(scratch, "banger/scratch", "scratch")
	pull(minbase, "banger/minbase", "minbase")
	pull(systemd, "banger/debian", "debian")
	return e, scratchPull
}

func TestE2EAnyImage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	e, scratchPull := images(t, ctx)
	d := e.D

	t.Run("pull records the config and the init", func(t *testing.T) {
		d := d.For(t)
		var img model.Image
		d.JSON(ctx, &img, "image", "inspect", "scratch")
		if img.Init != guestabi.InitBanger || img.Config == nil || strings.Join(img.Config.Entrypoint, " ") != "/app" ||
			img.Config.User != "1234:5678" || img.Config.WorkingDir != "/work" || strings.Join(img.Config.ExposedPorts, ",") != "8080/tcp" {
			t.Errorf("scratch image record: init %q config %+v", img.Init, img.Config)
		}
		if !strings.Contains(scratchPull, "no shell") || !strings.Contains(scratchPull, "banger's init") {
			t.Errorf("pulling scratch did not say it boots banger's init and has no shell:\n%s", scratchPull)
		}
		d.JSON(ctx, &img, "image", "inspect", "debian")
		if img.Init != guestabi.InitImage {
			t.Errorf("systemd image: init %q, want image (%s)", img.Init, img.InitReason)
		}
		if out := d.MustCLI(ctx, "image", "inspect", "busybox"); !strings.Contains(out, "banger's") || !strings.Contains(out, "GREETING=from the image") {
			t.Errorf("image inspect busybox:\n%s", out)
		}
	})

	t.Run("busybox", func(t *testing.T) {
		d := d.For(t)
		start := time.Now()
		d.MustCLI(ctx, "vm", "run", "--image", "busybox", "--name", "bb", "--env", "GREETING=hello there")
		t.Logf("busybox ready in %s", time.Since(start).Round(100*time.Millisecond))
		vm := waitMain(ctx, t, d, "bb")
		if vm.InitRan != guestabi.InitBanger || vm.Main.ExitCode == nil || *vm.Main.ExitCode != 3 || vm.Main.PID == 0 {
			t.Errorf("vm inspect: init %q main %+v, want banger's init and exit code 3", vm.InitRan, vm.Main)
		}
		c, err := guestabi.Parse(vm.KernelCmdline)
		if err != nil || !c.Network.Gateway.IsValid() {
			t.Fatalf("kernel command line %q: %v", vm.KernelCmdline, err)
		}
		logs := d.MustCLI(ctx, "vm", "logs", "bb", "--main")
		for _, want := range []string{"MAIN uid=0 gid=0 cwd=/tmp GREETING=hello there\n", "ZOMBIES=[]\n", "RNG=virtio_rng", "PING-OK " + c.Network.Gateway.String()} {
			if !strings.Contains(logs, want) {
				t.Errorf("vm logs --main lacks %q:\n%s", want, logs)
			}
		}
		if strings.Contains(logs, "banger-init:") || strings.Contains(logs, "main|") {
			t.Errorf("vm logs --main holds more than the main process's output:\n%s", logs)
		}
		stopClean(ctx, t, d, vm)
	})

	t.Run("scratch", func(t *testing.T) {
		d := d.For(t)
		d.MustCLI(ctx, "vm", "run", "--image", "scratch", "--name", "sc", "--cmd", "'a b' c")
		vm := waitMain(ctx, t, d, "sc")
		if vm.Main.ExitCode == nil || *vm.Main.ExitCode != 5 || strings.Join(vm.Main.Argv, "|") != "/app|a b|c" {
			t.Errorf("main %+v, want /app 'a b' c exiting 5", vm.Main)
		}
		if logs := d.MustCLI(ctx, "vm", "logs", "sc", "--main"); !strings.Contains(logs, "scratch-main uid=1234 gid=5678 cwd=/work GREETING=hi args=a b,c") {
			t.Errorf("vm logs --main:\n%s", logs)
		}
		stopClean(ctx, t, d, vm)
	})

	t.Run("debian minbase with its network cut", func(t *testing.T) {
		// The test namespace has no way out: first boot finds apt but no
		// mirror, and the VM comes up all the same.
		d := d.For(t)
		d.MustCLI(ctx, "vm", "run", "--image", "minbase", "--name", "mb")
		vm := waitMain(ctx, t, d, "mb")
		if vm.State != model.VMRunning || vm.Main.ExitCode == nil || *vm.Main.ExitCode != 7 {
			t.Errorf("state %s main %+v, want running and exit code 7", vm.State, vm.Main)
		}
		if vm.FirstBoot != string(guestabi.FirstBootFailed) && vm.FirstBoot != string(guestabi.FirstBootSkipped) {
			t.Errorf("first boot %q without a way out, want failed or skipped", vm.FirstBoot)
		}
		if logs := d.MustCLI(ctx, "vm", "logs", "mb", "--main"); !strings.Contains(logs, "MAIN nobody /var/tmp") {
			t.Errorf("vm logs --main:\n%s", logs)
		}
		// The daemon knows its namespace has no route out and says so on
		// the command line: first boot is skipped at once, no mirror probe.
		if c, _ := guestabi.Parse(vm.KernelCmdline); !c.NoEgress {
			t.Errorf("kernel command line %q lacks %s in a namespace without a route out", vm.KernelCmdline, guestabi.KeyNoEgress)
		}
		if logs := d.MustCLI(ctx, "vm", "logs", "mb"); !strings.Contains(logs, "first boot skipped: the host has no route out") {
			t.Errorf("console lacks first boot skipped for want of a route out:\n%s", e2etest.Tail(logs, 30))
		}
		stopClean(ctx, t, d, vm)
	})

	t.Run("systemd image with --init banger", func(t *testing.T) {
		d := d.For(t)
		start := time.Now()
		d.MustCLI(ctx, "vm", "run", "--image", "debian", "--name", "sb", "--init", "banger")
		t.Logf("systemd image on banger's init ready in %s", time.Since(start).Round(100*time.Millisecond))
		vm := e2etest.Inspect(ctx, t, d, "sb")
		if vm.InitRan != guestabi.InitBanger || vm.HostKey == "" {
			t.Errorf("init ran %q host key %q, want banger's init and the image's sshd's key", vm.InitRan, vm.HostKey)
		}
		if out := d.MustCLI(ctx, "ssh", "sb", "--", "cat", "/run/banger/init"); strings.TrimSpace(out) != "banger" {
			t.Errorf("ssh into the image's sshd: %q", out)
		}
		// Every vCPU comes up: the TCG machine's kernel arguments must not
		// cost SMP (acpi=noirq did, on Debian's kernel).
		if out := d.MustCLI(ctx, "ssh", "sb", "--", "nproc"); strings.TrimSpace(out) != strconv.Itoa(vm.CPUs) || vm.CPUs < 2 {
			t.Errorf("the guest sees %q CPUs, the VM has %d (want at least 2 and all of them)", strings.TrimSpace(out), vm.CPUs)
		}
		stopClean(ctx, t, d, vm)
	})
	d.MustCLI(ctx, "vm", "rm", "--force", "bb", "sc", "mb", "sb")
	e2etest.AssertNoVMResources(t, e, true)
}

// waitMain waits until the agent reports the VM's main process exited.
func waitMain(ctx context.Context, t *testing.T, d *e2etest.Daemon, name string) api.VM {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		vm := e2etest.Inspect(ctx, t, d, name)
		if vm.Main != nil && vm.Main.Status == guestabi.MainExited {
			return vm
		}
		if time.Now().After(deadline) {
			t.Fatalf("main process of %s never exited: %+v\nconsole:\n%s", name, vm.Main, e2etest.Tail(d.MustCLI(ctx, "vm", "logs", name), 30))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// stopClean stops the VM: under 5 s, through its agent (no SIGKILL of the
// monitor), and its ext4 clean by e2fsck -fn afterwards.
func stopClean(ctx context.Context, t *testing.T, d *e2etest.Daemon, vm api.VM) {
	t.Helper()
	disk := vm.Runtime.Disk.Path
	start := time.Now()
	var out api.VM
	d.JSON(ctx, &out, "vm", "stop", vm.Name)
	took := time.Since(start)
	t.Logf("vm stop %s took %s", vm.Name, took.Round(10*time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("vm stop %s took %s, want under 5s", vm.Name, took)
	}
	for _, r := range out.Recovery.Removed {
		if strings.Contains(r, "sigkill") || strings.Contains(r, "sigterm") {
			t.Errorf("stop had to %s the monitor", r)
		}
	}
	viaAgent := false
	for _, line := range strings.Split(d.Log(), "\n") {
		if strings.Contains(line, "guest powered off through its agent") && strings.Contains(line, "vm="+vm.Name+" ") && strings.Contains(line, "gone=true") {
			viaAgent = true
		}
	}
	if !viaAgent {
		t.Errorf("the daemon log does not show %s powered off through its agent", vm.Name)
	}
	if disk == "" {
		t.Fatalf("no disk path recorded for %s", vm.Name)
	}
	if b, err := exec.Command("e2fsck", "-fn", disk).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn %s after stop: %v\n%s", disk, err, b)
	}
}
