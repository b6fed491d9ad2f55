package kernels_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/kernels/initramfs"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

// markerOK is what the test root file system's init prints when it runs as
// PID 1 after switch_root with the vsock and net modules loaded.
const markerOK = "BANGER-MARKER ok"

// testInitSource is the /sbin/init of the test root file system.
const testInitSource = `package main

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

func main() {
	out, err := os.OpenFile("/dev/console", os.O_WRONLY, 0)
	if err != nil {
		out = os.Stdout
	}
	var problems []string
	if os.Getpid() != 1 {
		problems = append(problems, fmt.Sprintf("pid=%d", os.Getpid()))
	}
	mods, err := os.ReadFile("/proc/modules")
	if err != nil {
		problems = append(problems, "no /proc: "+err.Error())
	}
	for _, m := range []string{"virtio_blk ", "virtio_net ", "virtio_console ", "vmw_vsock_virtio_transport "} {
		if !strings.Contains(string(mods), m) {
			problems = append(problems, "module missing: "+m)
		}
	}
	if _, err := os.Stat("/init"); err == nil {
		problems = append(problems, "still on the initramfs")
	}
	uptime, _ := os.ReadFile("/proc/uptime")
	if len(problems) == 0 {
		fmt.Fprintln(out, "BANGER-MARKER ok uptime="+strings.Fields(string(uptime)+" ?")[0])
	} else {
		fmt.Fprintln(out, "BANGER-MARKER fail:", strings.Join(problems, "; "))
	}
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
}
`

var rootfsOnce struct {
	sync.Once
	path string
	err  error
}

// testRootfs builds a small ext4 whose /sbin/init prints the marker.
func testRootfs(t testing.TB) string {
	t.Helper()
	testutil.RequiresTool(t, "mkfs.ext4", "go")
	rootfsOnce.Do(func() {
		rootfsOnce.path, rootfsOnce.err = buildTestRootfs(filepath.Join(shared.dir, "rootfs"))
	})
	if rootfsOnce.err != nil {
		t.Fatalf("build test rootfs: %v", rootfsOnce.err)
	}
	return rootfsOnce.path
}

func buildTestRootfs(dir string) (string, error) {
	src := filepath.Join(dir, "src")
	tree := filepath.Join(dir, "tree")
	for _, d := range []string{src, filepath.Join(tree, "sbin"), filepath.Join(tree, "dev"), filepath.Join(tree, "proc"), filepath.Join(tree, "sys")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(filepath.Join(src, "main.go"), []byte(testInitSource), 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(src, "go.mod"), []byte("module testinit\n\ngo 1.22\n"), 0o644); err != nil {
		return "", err
	}
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(tree, "sbin", "init"), ".")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=-mod=mod", "GOWORK=off")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build test init: %w\n%s", err, out)
	}
	img := filepath.Join(dir, "rootfs.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, img, "32M").CombinedOutput(); err != nil {
		return "", fmt.Errorf("mkfs.ext4: %w\n%s", err, out)
	}
	return img, nil
}

// bootResult is what one QEMU boot showed.
type bootResult struct {
	console  string
	markerAt time.Duration // since QEMU start; 0 when the line never came
	exited   bool          // QEMU exited by itself before the timeout
	elapsed  time.Duration
}

// boot runs QEMU under TCG with the kernel, initrd and disk, and waits for
// it to exit (at most timeout). marker is the console line to time.
func boot(t testing.TB, kernel, initrd, disk, cmdline, marker string, timeout time.Duration) bootResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// The disk is attached read-only so parallel boots can share it.
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-M", "pc", "-accel", "tcg", "-m", "512", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-nographic",
		"-serial", "stdio", "-monitor", "none", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd, "-append", cmdline,
		"-drive", "file="+disk+",if=none,id=d0,format=raw,readonly=on",
		"-device", "virtio-blk-pci,drive=d0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	var res bootResult
	var out strings.Builder
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		out.WriteString(line + "\n")
		if res.markerAt == 0 && strings.Contains(line, marker) {
			res.markerAt = time.Since(start)
		}
	}
	werr := cmd.Wait()
	res.elapsed = time.Since(start)
	res.exited = ctx.Err() == nil
	res.console = out.String()
	if !res.exited {
		t.Logf("qemu killed after %s (wait: %v)", timeout, werr)
	} else if werr != nil {
		t.Logf("qemu exit: %v; stderr: %s", werr, stderr.String())
	}
	return res
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

const bootCmdline = "console=ttyS0 root=/dev/vda panic=-1 loglevel=4"

func TestBootDebianCloudKernel(t *testing.T) {
	testutil.RequiresQEMU(t)
	testutil.RequiresVM(t)
	k := debianKernel(t)
	disk := testRootfs(t)
	res := boot(t, k.Kernel.Path, k.Initrd.Path, disk, bootCmdline, "BANGER-MARKER", 90*time.Second)
	if !strings.Contains(res.console, markerOK) || !res.exited {
		t.Fatalf("boot: marker %q seen=%v, qemu exited=%v; console tail:\n%s", markerOK, strings.Contains(res.console, markerOK), res.exited, tail(res.console, 40))
	}
	if strings.Contains(res.console, "banger-init:") {
		t.Errorf("banger-init complained on a good boot:\n%s", tail(res.console, 20))
	}
	t.Logf("marker after %s, qemu exited after %s", res.markerAt.Round(time.Millisecond), res.elapsed.Round(time.Millisecond))
}

// TestBootFailuresPowerOff checks that each failure gives exactly one
// "banger-init: ..." line on the console and that the guest powers off.
func TestBootFailuresPowerOff(t *testing.T) {
	testutil.RequiresQEMU(t)
	testutil.RequiresVM(t)
	k := debianKernel(t)
	disk := testRootfs(t)

	// An initrd whose module list names a module that is not there: a
	// second cpio appended to the generated one replaces the list file
	// (the kernel unpacks concatenated archives in order).
	missing := filepath.Join(t.TempDir(), "initrd-missing-module")
	writeOverlayInitrd(t, k, missing, map[string]string{
		initramfs.ModulesListPath: "/lib/modules/" + k.Version + "/kernel/drivers/virtio/virtio_missing.ko\n",
	})

	for _, tc := range []struct {
		name, initrd, cmdline, want string
	}{
		{"missing root device", k.Initrd.Path, "console=ttyS0 root=/dev/vdz banger.rootwait=1 panic=-1 loglevel=4",
			"banger-init: wait for root device /dev/vdz: not present after 1s (block devices: vda"},
		{"missing module", missing, bootCmdline,
			"banger-init: load module virtio_missing: open /lib/modules/" + k.Version + "/kernel/drivers/virtio/virtio_missing.ko: no such file or directory"},
		{"missing init", k.Initrd.Path, bootCmdline + " init=/sbin/nope",
			"banger-init: find init /sbin/nope in the root file system: no such file or directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := boot(t, k.Kernel.Path, tc.initrd, disk, tc.cmdline, "banger-init:", 60*time.Second)
			if !res.exited {
				t.Fatalf("qemu did not exit within 60s (guest hung instead of powering off); console tail:\n%s", tail(res.console, 30))
			}
			var lines []string
			for _, l := range strings.Split(res.console, "\n") {
				// SeaBIOS leaves escape codes without a newline before
				// the kernel's first output; look inside the line.
				if i := strings.Index(l, "banger-init:"); i >= 0 {
					lines = append(lines, strings.TrimSpace(l[i:]))
				}
			}
			if len(lines) != 1 || !strings.HasPrefix(lines[0], tc.want) {
				t.Fatalf("banger-init console lines = %q, want exactly one starting with %q; console tail:\n%s", lines, tc.want, tail(res.console, 30))
			}
			if strings.Contains(res.console, "BANGER-MARKER") {
				t.Errorf("the root file system's init ran although banger-init failed")
			}
			if !strings.Contains(res.console, "reboot: Power down") {
				t.Errorf("no kernel power-down message; console tail:\n%s", tail(res.console, 10))
			}
		})
	}
}

// writeOverlayInitrd writes k's initrd followed by a gzip'd cpio holding files.
func writeOverlayInitrd(t testing.TB, k model.Kernel, out string, files map[string]string) {
	t.Helper()
	base, err := os.ReadFile(k.Initrd.Path)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	buf.Write(base)
	zw := gzip.NewWriter(&buf)
	cw := initramfs.NewWriter(zw)
	for name, data := range files {
		if err := cw.File(name, 0o644, []byte(data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := cw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}
