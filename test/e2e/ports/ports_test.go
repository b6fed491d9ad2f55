// Package ports tests port forwarding and host folders against a real
// guest: QEMU under TCG booting Debian's cloud kernel with an initramfs that
// holds busybox and banger's real guest program, reached over the real
// virtio-serial agent channel. The host side is internal/portfwd and
// internal/mounts driven on the agent session, as the daemon drives them.
package ports

import (
	"bytes"
	"context"
	"crypto/rand"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/mounts"
	"github.com/bangerdev/banger/internal/portfwd"
	"github.com/bangerdev/banger/internal/testutil"
)

// guest is one booted test guest.
type guest struct {
	client *agent.Client
	work   string // world-traversable scratch dir (0755)
	banger string // the banger binary, for mount-server
}

func goBuild(ctx context.Context, t *testing.T, out, pkg string) {
	t.Helper()
	cmd := exec.CommandContext(ctx, "go", "build", "-ldflags=-s -w", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v: %s", pkg, err, b)
	}
}

func copyFile(t *testing.T, from, to string, perm os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, perm); err != nil {
		t.Fatal(err)
	}
}

// bootGuest boots the guest and returns an upgraded agent session to it.
func bootGuest(t *testing.T, ctx context.Context) *guest {
	t.Helper()
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "dpkg-deb", "cpio", "depmod", "modprobe")
	if f, err := elf.Open("/bin/busybox"); err != nil {
		testutil.Missing(t, testutil.TierTools, "busybox-static is needed at /bin/busybox: "+err.Error())
	} else {
		_ = f.Close()
	}
	deb := testutil.DebianKernelDeb(t)
	// Not under the harness's TMPDIR (0700): uid 65534 runs the mount
	// server from here and must reach the shared folders.
	work, err := os.MkdirTemp("/tmp", "banger-ports-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(work) })
	if err := os.Chmod(work, 0o755); err != nil {
		t.Fatal(err)
	}
	root, _ := os.Getwd()
	repo := filepath.Join(root, "../../..")
	bin := filepath.Join(work, "bin")
	goBuild(ctx, t, filepath.Join(bin, "banger-vsock-agent"), filepath.Join(repo, "cmd/banger-vsock-agent"))
	goBuild(ctx, t, filepath.Join(bin, "banger"), filepath.Join(repo, "cmd/banger"))
	goBuild(ctx, t, filepath.Join(bin, "udpecho"), filepath.Join(root, "testdata/udpecho"))

	kx := filepath.Join(work, "kernel")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, kx).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -x: %v: %s", err, out)
	}
	vmlinuz, _ := filepath.Glob(filepath.Join(kx, "boot", "vmlinuz-*"))
	if len(vmlinuz) != 1 {
		t.Fatalf("want one vmlinuz, got %v", vmlinuz)
	}
	release := strings.TrimPrefix(filepath.Base(vmlinuz[0]), "vmlinuz-")
	if out, err := exec.CommandContext(ctx, "depmod", "-b", kx, release).CombinedOutput(); err != nil {
		t.Fatalf("depmod: %v: %s", err, out)
	}
	out, err := exec.CommandContext(ctx, "modprobe", "-d", kx, "-S", release, "--show-depends", "virtio_pci").CombinedOutput()
	if err != nil {
		t.Fatalf("modprobe --show-depends: %v: %s", err, out)
	}
	out2, err := exec.CommandContext(ctx, "modprobe", "-d", kx, "-S", release, "--show-depends", "virtio_console").CombinedOutput()
	if err != nil {
		t.Fatalf("modprobe --show-depends: %v: %s", err, out2)
	}
	ird := filepath.Join(work, "initrd")
	var load []string
	seen := map[string]bool{}
	for _, line := range strings.Split(string(out)+string(out2), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "insmod" || seen[f[1]] {
			continue
		}
		seen[f[1]] = true
		name := filepath.Base(f[1])
		copyFile(t, f[1], filepath.Join(ird, "lib/modules", name), 0o644)
		load = append(load, "/lib/modules/"+name)
	}
	// fuse where the guest side looks for it (mounts.EnsureFUSE loads it).
	fuse, _ := filepath.Glob(filepath.Join(kx, "lib/modules", release, "kernel/fs/fuse/fuse.ko*"))
	if len(fuse) != 1 {
		t.Fatalf("want fuse.ko in the kernel package, got %v", fuse)
	}
	copyFile(t, fuse[0], filepath.Join(ird, "lib/modules", release, "kernel/fs/fuse", filepath.Base(fuse[0])), 0o644)
	copyFile(t, "/bin/busybox", filepath.Join(ird, "bin/busybox"), 0o755)
	copyFile(t, filepath.Join(bin, "banger-vsock-agent"), filepath.Join(ird, "bin/banger-vsock-agent"), 0o755)
	copyFile(t, filepath.Join(bin, "udpecho"), filepath.Join(ird, "bin/udpecho"), 0o755)
	for _, d := range []string{"dev", "proc", "sys", "tmp", "mnt", "etc", "root", "www"} {
		if err := os.MkdirAll(filepath.Join(ird, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(ird, "www/index.html"), []byte(guestPage), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ird, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	initScript := `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
ip link set lo up
for m in ` + strings.Join(load, " ") + `; do insmod "$m"; done
httpd -p 127.0.0.1:8080 -h /www
/bin/udpecho 127.0.0.1:9999 &
echo "banger-ports-test: up"
/bin/banger-vsock-agent -retry 200ms &
wait
`
	if err := os.WriteFile(filepath.Join(ird, "init"), []byte(initScript), 0o755); err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(work, "initrd.cpio")
	pack := exec.CommandContext(ctx, "sh", "-c", "cd "+ird+" && find . | cpio -o -H newc --quiet > "+initrd)
	if out, err := pack.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v: %s", err, out)
	}

	sock := filepath.Join(work, "agent.sock")
	consoleLog := filepath.Join(work, "console.log")
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-M", "pc", "-accel", "tcg", "-m", "512", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", vmlinuz[0], "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 loglevel=4",
		"-serial", "file:"+consoleLog,
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=agent,path="+sock+",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name="+agent.SerialPortName,
	)
	qemu.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var qemuOut bytes.Buffer
	qemu.Stdout, qemu.Stderr = &qemuOut, &qemuOut
	booted := time.Now()
	if err := qemu.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	qemuDone := make(chan struct{})
	go func() { _ = qemu.Wait(); close(qemuDone) }()
	t.Cleanup(func() {
		_ = qemu.Process.Kill()
		<-qemuDone
		if t.Failed() {
			console, _ := os.ReadFile(consoleLog)
			if len(console) > 6000 {
				console = console[len(console)-6000:]
			}
			t.Logf("qemu output:\n%s\nguest console (tail):\n%s", qemuOut.String(), console)
		}
	})
	dial := func(ctx context.Context) (*agent.Client, error) {
		select {
		case <-qemuDone:
			return nil, fmt.Errorf("qemu exited: %s", qemuOut.String())
		default:
		}
		return agent.Dial(ctx, agent.TransportVirtioSerial, sock)
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if _, err := agent.WaitHealthy(wctx, dial, 500*time.Millisecond, nil); err != nil {
		t.Fatalf("agent never healthy: %v", err)
	}
	c, err := dial(wctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Upgrade(wctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	t.Logf("guest agent ready %s after QEMU started", time.Since(booted).Round(100*time.Millisecond))
	return &guest{client: c, work: work, banger: filepath.Join(bin, "banger")}
}

const guestPage = "<html>served by busybox httpd on the guest's loopback</html>\n"

// exec runs a shell command in the guest and returns its output and status.
func (g *guest) exec(t *testing.T, ctx context.Context, script string) (string, int) {
	t.Helper()
	st, err := g.client.OpenStream(ctx, agent.Request{Op: agent.OpExec, Exec: &agent.ExecRequest{Argv: []string{"sh", "-c", script}}})
	if err != nil {
		t.Fatalf("exec %q: %v", script, err)
	}
	var out bytes.Buffer
	es, err := agent.RunExec(ctx, st, agent.ExecIO{Stdout: &out, Stderr: &out})
	if err != nil {
		t.Fatalf("exec %q: %v", script, err)
	}
	return out.String(), es.Code
}

// TestE2EGuestPortsAndMounts: one guest, shared by the port and mount
// checks (and, with BANGER_BENCH=1, the guest benchmarks).
func TestE2EGuestPortsAndMounts(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	g := bootGuest(t, ctx)
	t.Run("ports", func(t *testing.T) { testPorts(t, ctx, g) })
	t.Run("mounts", func(t *testing.T) { testMounts(t, ctx, g) })
	if os.Getenv("BANGER_BENCH") == "1" {
		t.Run("bench", func(t *testing.T) { benchGuest(t, ctx, g) })
	}
}

// benchGuest measures, under TCG over virtio-serial: a 64 MiB download
// from the guest's httpd through a published port, and a sequential read
// in the guest of a 64 MiB host file through the mount against the same
// file in the guest's own memory (tmpfs; this guest has no disk).
func benchGuest(t *testing.T, ctx context.Context, g *guest) {
	const size = 64 << 20
	if out, code := g.exec(t, ctx, "dd if=/dev/zero of=/www/big bs=1M count=64 2>&1"); code != 0 {
		t.Fatalf("make /www/big: %s", out)
	}
	set, err := portfwd.Publish(ctx, []portfwd.Spec{{HostIP: portfwd.DefaultHostIP, GuestPort: 8080, Proto: portfwd.TCP}}, g.client, portfwd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	start := time.Now()
	resp, err := http.Get("http://" + set.Specs()[0].HostAddr().String() + "/big")
	if err != nil {
		t.Fatal(err)
	}
	n, _ := io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	if n != size {
		t.Fatalf("downloaded %d bytes, want %d", n, size)
	}
	t.Logf("published port, 64 MiB from the guest's httpd: %.1f MB/s", float64(size)/1e6/time.Since(start).Seconds())
	var lat []time.Duration
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for i := 0; i < 50; i++ {
		s := time.Now()
		r, err := client.Get("http://" + set.Specs()[0].HostAddr().String() + "/index.html")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, r.Body)
		_ = r.Body.Close()
		lat = append(lat, time.Since(s))
	}
	slices.Sort(lat)
	t.Logf("published port, small HTTP request: p50 %s p99 %s", lat[len(lat)/2].Round(time.Microsecond), lat[len(lat)*99/100].Round(time.Microsecond))

	share := filepath.Join(g.work, "bench")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(share, "big"))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.CopyN(f, rand.Reader, size)
	_ = f.Close()
	ms, err := mounts.Attach(ctx, g.client, mounts.Launcher{Command: []string{g.banger, "mount-server"}}, mounts.Caller{}, []mounts.Spec{{HostDir: share, GuestDir: "/mnt/bench", ReadOnly: true}}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close()
	timed := func(script string) time.Duration {
		s := time.Now()
		if out, code := g.exec(t, ctx, script); code != 0 {
			t.Fatalf("%s: %s", script, out)
		}
		return time.Since(s)
	}
	mnt := timed("cat /mnt/bench/big > /dev/null")
	_ = timed("cp /mnt/bench/big /tmp/big")
	own := timed("cat /tmp/big > /dev/null")
	t.Logf("sequential read of 64 MiB in the guest: mount %.1f MB/s, guest tmpfs %.1f MB/s (%.2fx)",
		float64(size)/1e6/mnt.Seconds(), float64(size)/1e6/own.Seconds(), own.Seconds()/mnt.Seconds())
}

func testPorts(t *testing.T, ctx context.Context, g *guest) {
	specs := []portfwd.Spec{
		{HostIP: portfwd.DefaultHostIP, GuestPort: 8080, Proto: portfwd.TCP},
		{HostIP: portfwd.DefaultHostIP, GuestPort: 8099, Proto: portfwd.TCP}, // nothing listens
		{HostIP: portfwd.DefaultHostIP, GuestPort: 9999, Proto: portfwd.UDP},
	}
	set, err := portfwd.Publish(ctx, specs, g.client, portfwd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	bound := set.Specs()
	// busybox httpd on the guest's loopback 8080, through -p 0:8080.
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + bound[0].HostAddr().String() + "/index.html")
	if err != nil {
		t.Fatalf("GET through %v: %v", bound[0], err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if string(body) != guestPage {
		t.Errorf("GET through %v = %q, want the guest's page %q", bound[0], body, guestPage)
	}
	// A guest port with nothing listening: reset, not a hang.
	start := time.Now()
	conn, err := net.Dial("tcp", bound[1].HostAddr().String())
	if err == nil {
		_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		_ = conn.Close()
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("forward to a guest port nobody listens on: %v after %s; want a reset", err, time.Since(start))
	}
	// UDP round trip.
	u, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(bound[2].HostAddr()))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	buf := make([]byte, 2048)
	var got string
	for try := 0; try < 10 && got == ""; try++ {
		_, _ = u.Write([]byte("ping over udp"))
		_ = u.SetReadDeadline(time.Now().Add(3 * time.Second))
		if n, err := u.Read(buf); err == nil {
			got = string(buf[:n])
		}
	}
	if got != "echo:ping over udp" {
		t.Errorf("UDP through %v: got %q, want %q", bound[2], got, "echo:ping over udp")
	}
	// Closing the set closes the host listeners.
	_ = set.Close()
	if c, err := net.Dial("tcp", bound[0].HostAddr().String()); err == nil {
		_ = c.Close()
		t.Errorf("%v still accepts after Close", bound[0])
	}
}

func testMounts(t *testing.T, ctx context.Context, g *guest) {
	nobody := mounts.Caller{UID: 65534, GID: 65534}
	share := filepath.Join(g.work, "share")
	private := filepath.Join(g.work, "private")
	for _, d := range []string{share, private} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(g.work, "secret"), []byte("host secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(share, "hello.txt"), []byte("from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../secret", filepath.Join(share, "escape")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/root", filepath.Join(g.work, "to-root")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{share, filepath.Join(share, "hello.txt"), filepath.Join(share, "escape")} {
		if err := os.Lchown(p, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	launcher := mounts.Launcher{Command: []string{g.banger, "mount-server"}}
	// A caller without access, and a symlink to /root, are refused.
	for _, dir := range []string{private, filepath.Join(g.work, "to-root")} {
		err := mounts.CheckAll(ctx, launcher, nobody, []mounts.Spec{{HostDir: dir, GuestDir: "/mnt/x"}})
		if !errors.Is(err, mounts.ErrAccess) {
			t.Errorf("mount of %s as uid 65534: %v; want ErrAccess", dir, err)
		}
	}
	specs := []mounts.Spec{{HostDir: share, GuestDir: "/mnt/src"}, {HostDir: share, GuestDir: "/mnt/ro", ReadOnly: true}}
	if err := mounts.CheckAll(ctx, launcher, nobody, specs); err != nil {
		t.Fatal(err)
	}
	set, err := mounts.Attach(ctx, g.client, launcher, nobody, specs, os.Stderr)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	defer set.Close()
	// Both sides write; the host files are the caller's.
	out, code := g.exec(t, ctx, "cat /mnt/src/hello.txt && echo from the guest > /mnt/src/guest.txt && mkdir -p /mnt/src/d/e && echo x > /mnt/src/d/e/f && ls -ln /mnt/src")
	if code != 0 || !strings.Contains(out, "from the host") {
		t.Fatalf("guest side of the mount: exit %d, output:\n%s", code, out)
	}
	if b, err := os.ReadFile(filepath.Join(share, "guest.txt")); err != nil || string(b) != "from the guest\n" {
		t.Errorf("host reads the guest's file: %q, %v", b, err)
	}
	for _, p := range []string{"guest.txt", "d", "d/e/f"} {
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(share, p), &st); err != nil || st.Uid != 65534 || st.Gid != 65534 {
			t.Errorf("host owner of %s = %d:%d (%v); want the caller 65534:65534", p, st.Uid, st.Gid, err)
		}
	}
	big := make([]byte, 3<<20)
	_, _ = rand.Read(big)
	if err := os.WriteFile(filepath.Join(share, "big.bin"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	_ = os.Chown(filepath.Join(share, "big.bin"), 65534, 65534)
	hostSum, _ := exec.Command("sha256sum", filepath.Join(share, "big.bin")).Output()
	out, code = g.exec(t, ctx, "sleep 1.2; sha256sum /mnt/src/big.bin")
	if code != 0 || strings.Fields(out)[0] != strings.Fields(string(hostSum))[0] {
		t.Errorf("guest sha256 of a host file = %q (exit %d); host %q", out, code, hostSum)
	}
	// :ro refuses guest writes.
	out, code = g.exec(t, ctx, "cat /mnt/ro/hello.txt && echo no > /mnt/ro/new.txt")
	if code == 0 || !strings.Contains(out, "from the host") {
		t.Errorf("write to a :ro mount: exit %d, output %q; want a refusal after the read", code, out)
	}
	if _, err := os.Stat(filepath.Join(share, "new.txt")); err == nil {
		t.Error("a :ro mount let the guest create new.txt")
	}
	// A symlink pointing out of the folder resolves in the guest, never to
	// the host's file; a guest-made link out and ".." stay in the guest.
	out, _ = g.exec(t, ctx, "cat /mnt/src/escape; cat /mnt/src/../../etc/passwd; ln -s /etc/passwd /mnt/src/pw && cat /mnt/src/pw")
	if strings.Contains(out, "host secret") {
		t.Errorf("the guest read the host's file outside the folder:\n%s", out)
	}
	if target, err := os.Readlink(filepath.Join(share, "pw")); err != nil || target != "/etc/passwd" {
		t.Errorf("host readlink of the guest's symlink = %q, %v", target, err)
	}
	// Ending the set unmounts in the guest.
	_ = set.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, _ := g.exec(t, ctx, "grep -c ' /mnt/src ' /proc/mounts")
		if strings.TrimSpace(out) == "0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest still has /mnt/src mounted 30 s after its server stopped")
		}
		time.Sleep(500 * time.Millisecond)
	}
}
