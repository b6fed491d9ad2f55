package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
)

// TestQEMUVirtioSerialAgent boots Debian's cloud kernel under QEMU TCG with
// an initramfs holding busybox, the virtio modules and the real agent
// binary, with a virtio-serial port org.banger.agent on a Unix-socket
// chardev. There is no udev in an initramfs, so the agent must find its
// port through sysfs; it starts before the modules load, so it must wait
// for the port. The host then talks to it through the chardev socket,
// reconnecting several times over the same guest port.
func TestQEMUVirtioSerialAgent(t *testing.T) {
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "dpkg-deb")
	busybox := "/bin/busybox"
	if f, err := elf.Open(busybox); err != nil {
		testutil.Missing(t, testutil.TierTools, "busybox-static is needed at /bin/busybox: "+err.Error())
	} else {
		static := !hasInterp(f)
		_ = f.Close()
		if !static {
			testutil.Missing(t, testutil.TierTools, "/bin/busybox is dynamically linked: install busybox-static")
		}
	}
	deb := testutil.DebianKernelDeb(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	work := t.TempDir()
	agentBin := buildStaticAgent(ctx, t, work)

	kx := filepath.Join(work, "kernel")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, kx).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -x %s: %v: %s", deb, err, out)
	}
	vmlinuz, _ := filepath.Glob(filepath.Join(kx, "boot", "vmlinuz-*"))
	if len(vmlinuz) != 1 {
		t.Fatalf("want one vmlinuz in %s, got %v", deb, vmlinuz)
	}
	mods, err := moduleLoadOrder(filepath.Join(kx, "lib", "modules"), []string{"virtio_pci", "virtio_console"})
	if err != nil {
		t.Fatal(err)
	}

	hostKey := testKey(t, "root@guest")
	var ird cpioWriter
	for _, d := range []string{"bin", "dev", "proc", "sys", "lib", "lib/modules", "etc", "etc/ssh", "root", "var", "var/lib", "var/lib/banger", "var/log"} {
		ird.dir(d)
	}
	ird.node("dev/console", 0o020600, 5, 1)
	ird.file("bin/busybox", 0o755, mustRead(t, busybox))
	ird.file("bin/banger-vsock-agent", 0o755, mustRead(t, agentBin))
	var load []string
	for _, m := range mods {
		name := filepath.Base(m)
		ird.file("lib/modules/"+name, 0o644, mustRead(t, m))
		load = append(load, "/lib/modules/"+name)
	}
	ird.file("var/lib/banger/first-boot-status", 0o644, []byte("running\n"))
	ird.file("var/lib/banger/first-boot-pending", 0o644, nil)
	ird.file("var/log/banger-first-boot.log", 0o644, []byte("apt-get update\ninstalling openssh-server\n"))
	ird.file("etc/ssh/ssh_host_ed25519_key.pub", 0o644, []byte(hostKey+"\n"))
	ird.file("init", 0o755, []byte(`#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
hostname banger-qemu-test
echo "banger-test: starting agent before the port exists"
/bin/banger-vsock-agent -retry 200ms &
sleep 1
for m in `+strings.Join(load, " ")+`; do insmod "$m" || echo "banger-test: insmod $m failed"; done
echo "banger-test: modules loaded: $(ls /sys/class/virtio-ports 2>&1)"
wait
`))
	initrd := filepath.Join(work, "initrd.cpio")
	if err := os.WriteFile(initrd, ird.finish(), 0o600); err != nil {
		t.Fatal(err)
	}

	sock := filepath.Join(work, "agent.sock")
	consoleLog := filepath.Join(work, "console.log")
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64", //nolint:gosec // test-built arguments
		"-M", "pc", "-accel", "tcg", "-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", vmlinuz[0], "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 loglevel=4",
		"-serial", "file:"+consoleLog,
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=agent,path="+sock+",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name="+SerialPortName,
	)
	var qemuOut bytes.Buffer
	qemu.Stdout, qemu.Stderr = &qemuOut, &qemuOut
	booted := time.Now()
	if err := qemu.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	qemuDone := make(chan struct{})
	go func() { _ = qemu.Wait(); close(qemuDone) }()
	defer func() {
		_ = qemu.Process.Kill()
		<-qemuDone
		if t.Failed() {
			console, _ := os.ReadFile(consoleLog)
			t.Logf("qemu output:\n%s\nguest console (tail):\n%s", qemuOut.String(), tail(console, 4000))
		}
	}()

	dial := func(ctx context.Context) (*Client, error) {
		select {
		case <-qemuDone:
			return nil, fmt.Errorf("qemu exited: %s", qemuOut.String())
		default:
		}
		return Dial(ctx, TransportVirtioSerial, sock)
	}
	waitCtx, waitCancel := context.WithTimeout(ctx, 90*time.Second)
	defer waitCancel()
	h, err := WaitHealthy(waitCtx, dial, 500*time.Millisecond, func(n int, err error) {
		if n%10 == 0 {
			t.Logf("waiting for the agent (attempt %d): %v", n, err)
		}
	})
	if err != nil {
		t.Fatalf("agent never healthy over virtio-serial: %v", err)
	}
	t.Logf("boot to agent-healthy over virtio-serial under TCG: %s", time.Since(booted).Round(10*time.Millisecond))
	if h.Hostname != "banger-qemu-test" || h.AgentVersion != "qemu-test" {
		t.Errorf("Health = %+v, want hostname banger-qemu-test and version qemu-test", h)
	}

	c, err := dial(ctxWithin(t, ctx, 20*time.Second))
	if err != nil {
		t.Fatalf("second dial: %v", err)
	}
	st, err := c.Status(ctxWithin(t, ctx, 20*time.Second))
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.FirstBoot != FirstBootRunning || len(st.FirstBootLog) != 2 || st.FirstBootLog[1] != "installing openssh-server" ||
		st.HostKey != strings.Join(strings.Fields(hostKey)[:2], " ") {
		t.Errorf("Status = %+v, want running, the 2 log lines and the host key", st)
	}
	key := testKey(t, "banger@host")
	for i, want := range []bool{true, false} {
		added, err := c.AuthorizeKey(ctxWithin(t, ctx, 20*time.Second), key)
		if err != nil || added != want {
			t.Errorf("AuthorizeKey #%d in the guest = %v, %v; want %v", i+1, added, err, want)
		}
	}
	_ = c.Close()

	// A host that dies mid-frame must not wedge the port for the next one.
	raw, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	half := mustFrame(t, Request{V: 1, ID: 1, Op: OpAuthorizeKey, Key: strings.Repeat("k", 3000)})
	_, _ = raw.Write(half[:100])
	_ = raw.Close()
	start := time.Now()
	c, err = dial(ctxWithin(t, ctx, 20*time.Second))
	if err != nil {
		t.Fatalf("dial after a host died mid-frame: %v", err)
	}
	if _, err := c.Health(ctxWithin(t, ctx, 20*time.Second)); err != nil {
		t.Errorf("Health after a host died mid-frame: %v", err)
	}
	t.Logf("reconnect after a truncated frame took %s", time.Since(start).Round(time.Millisecond))
	_ = c.Close()

	// The mux over the real port: exec, a stream of data, concurrent
	// sessions; then a host disconnect returns the port to framed requests
	// and the next host multiplexes again.
	for round := 1; round <= 2; round++ {
		c, err = dial(ctxWithin(t, ctx, 20*time.Second))
		if err != nil {
			t.Fatalf("round %d: dial for mux: %v", round, err)
		}
		r := runExec(t, c, ExecRequest{Argv: []string{"sh", "-c", "echo hi from $(hostname); exit 7"}}, ExecIO{})
		if r.err != nil || r.st.Code != 7 || r.stdout != "hi from banger-qemu-test\n" {
			t.Errorf("round %d: exec over virtio-serial = %+v; want exit 7 and the greeting", round, r)
		}
		data := bytes.Repeat([]byte("0123456789abcdef"), 256<<10) // 4 MiB
		start := time.Now()
		r = runExec(t, c, ExecRequest{Argv: []string{"sha256sum"}, Stdin: true}, ExecIO{Stdin: bytes.NewReader(data)})
		sum := sha256.Sum256(data)
		if r.err != nil || r.st.Code != 0 || !strings.HasPrefix(r.stdout, hex.EncodeToString(sum[:])) {
			t.Errorf("round %d: sha256sum over virtio-serial = %+v; want %x", round, r, sum)
		}
		t.Logf("round %d: 4 MiB through exec -i sha256sum over virtio-serial in %s", round, time.Since(start).Round(time.Millisecond))
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := runExec(t, c, ExecRequest{Argv: []string{"sh", "-c", fmt.Sprintf("sleep 0.5; exit %d", i)}}, ExecIO{})
				if r.err != nil || r.st.Code != i {
					t.Errorf("round %d: concurrent exec %d = %+v", round, i, r)
				}
			}()
		}
		wg.Wait()
		if _, err := c.Health(ctxWithin(t, ctx, 20*time.Second)); err != nil {
			t.Errorf("round %d: Health over the mux: %v", round, err)
		}
		_ = c.Close()
	}
}

func ctxWithin(t *testing.T, parent context.Context, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(parent, d)
	t.Cleanup(cancel)
	return ctx
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p) //nolint:gosec // test fixture path
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func hasInterp(f *elf.File) bool {
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return true
		}
	}
	return false
}

// buildStaticAgent builds cmd/banger-vsock-agent with CGO_ENABLED=0 and
// checks the result has no ELF interpreter (is statically linked).
func buildStaticAgent(ctx context.Context, t *testing.T, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "banger-vsock-agent")
	cmd := exec.CommandContext(ctx, "go", "build", "-ldflags=-s -w -X main.version=qemu-test", "-o", out,
		"github.com/bangerdev/banger/cmd/banger-vsock-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build the agent: %v: %s", err, b)
	}
	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if hasInterp(f) {
		t.Fatalf("%s has an ELF interpreter: not statically linked", out)
	}
	return out
}

// moduleLoadOrder finds each named module under dir and its dependencies
// (from the .modinfo "depends=" field), returned dependencies first.
func moduleLoadOrder(dir string, names []string) ([]string, error) {
	paths := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(p, ".ko") {
			paths[strings.TrimSuffix(d.Name(), ".ko")] = p
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	var order []string
	seen := map[string]bool{}
	var visit func(string) error
	visit = func(name string) error {
		name = strings.ReplaceAll(name, "-", "_")
		if seen[name] {
			return nil
		}
		seen[name] = true
		p, ok := paths[name]
		if !ok {
			return fmt.Errorf("module %s not found under %s", name, dir)
		}
		deps, err := moduleDepends(p)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		order = append(order, p)
		return nil
	}
	for _, n := range names {
		if err := visit(n); err != nil {
			return nil, err
		}
	}
	return order, nil
}

func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s has no .modinfo", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, nil
}

// cpioWriter builds an uncompressed newc ("070701") archive, the format
// the kernel unpacks as an initramfs.
type cpioWriter struct {
	buf bytes.Buffer
	ino int
}

func (w *cpioWriter) entry(name string, mode uint32, rdevMajor, rdevMinor int, data []byte) {
	w.ino++
	fmt.Fprintf(&w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
	w.buf.Write(data)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

func (w *cpioWriter) dir(name string) { w.entry(name, 0o040755, 0, 0, nil) }
func (w *cpioWriter) file(name string, perm uint32, data []byte) {
	w.entry(name, 0o100000|perm, 0, 0, data)
}
func (w *cpioWriter) node(name string, mode uint32, major, minor int) {
	w.entry(name, mode, major, minor, nil)
}

func (w *cpioWriter) finish() []byte {
	w.entry("TRAILER!!!", 0, 0, 0, nil)
	return w.buf.Bytes()
}
