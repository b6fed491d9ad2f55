package qemu

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

func baseSpec(dir string) vmm.Spec {
	return vmm.Spec{
		VMID: "01ABC", Name: "t", CPUs: 2, MemoryMiB: 512, Kernel: "/k/vmlinuz", Initrd: "/k/initrd",
		Cmdline: "console=ttyS0 root=/dev/vda", RuntimeDir: dir, ConsoleLog: filepath.Join(dir, "console.log"),
	}
}

// hasSeq reports whether args contains want as consecutive elements.
func hasSeq(args []string, want ...string) bool {
	for i := 0; i+len(want) <= len(args); i++ {
		if slices.Equal(args[i:i+len(want)], want) {
			return true
		}
	}
	return false
}

func TestBuildArgs(t *testing.T) {
	dir := "/run/banger/vms/x"
	tests := []struct {
		name      string
		mutate    func(*vmm.Spec)
		caps      vmm.Caps
		want      [][]string
		absent    []string
		opens     []opening // checked when set
		transport string
	}{
		{
			name: "tcg, virtio-serial, no disk, no tap",
			want: [][]string{
				{"-machine", "pc", "-accel", "tcg"}, {"-smp", "2"}, {"-m", "512M"}, {"-no-reboot"},
				{"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"},
				{"-object", "secret,id=banger-runtime,data=/run/banger/vms/x/qmp.sock"},
				{"-kernel", "/proc/self/fd/3"}, {"-initrd", "/proc/self/fd/4"}, {"-append", "console=ttyS0 root=/dev/vda"}, {"-device", "virtio-rng-pci"},
				{"-chardev", "socket,id=console,server=on,wait=off,fd=5"}, {"-serial", "chardev:console"},
				{"-chardev", "socket,id=qmp,server=on,wait=off,fd=6"},
				{"-device", "virtio-serial-pci"},
				{"-chardev", "socket,id=agent,server=on,wait=off,fd=7"},
				{"-device", "virtserialport,chardev=agent,name=org.banger.agent"},
				{"-name", "banger-01ABC"},
			},
			absent: []string{"-netdev", "-blockdev", "-daemonize", "path="},
			opens: []opening{
				{openCopy, "/k/vmlinuz"}, {openCopy, "/k/initrd"}, {openListen, dir + "/console.sock"},
				{openListen, dir + "/qmp.sock"}, {openListen, dir + "/agent.sock"},
			},
			transport: vmm.TransportVirtioSerial,
		},
		{
			name: "kvm, vhost-vsock, disk file, tap",
			mutate: func(s *vmm.Spec) {
				s.Disk = "/var/lib/banger/disk,1.img"
				s.Tap = "bgr-tap1"
				s.MAC = "06:00:0a:00:00:02"
				s.VsockCID = 7
			},
			caps: vmm.Caps{KVM: true, VhostVsock: true},
			want: [][]string{
				{"-machine", "q35", "-accel", "kvm"},
				{"-append", "console=ttyS0 root=/dev/vda"},
				{"-add-fd", "fd=7,set=1,opaque=disk0"},
				{"-blockdev", "driver=raw,node-name=disk0,discard=unmap,file.driver=file,file.filename=/dev/fdset/1"},
				{"-device", "virtio-blk-pci,drive=disk0"},
				{"-netdev", "tap,id=net0,fd=8"},
				{"-device", "virtio-net-pci,netdev=net0,mac=06:00:0a:00:00:02"},
				{"-device", "vhost-vsock-pci,guest-cid=7,vhostfd=9"},
			},
			absent: []string{"virtio-serial-pci", "path=", "ifname="},
			opens: []opening{
				{openCopy, "/k/vmlinuz"}, {openCopy, "/k/initrd"}, {openListen, dir + "/console.sock"},
				{openListen, dir + "/qmp.sock"}, {openRW, "/var/lib/banger/disk,1.img"}, {openTap, "bgr-tap1"},
				{openRW, "/dev/vhost-vsock"},
			},
			transport: vmm.TransportVsock,
		},
		{
			name:   "explicit tcg on a KVM host, block device disk",
			mutate: func(s *vmm.Spec) { s.Accel = "tcg"; s.Disk = "/dev/null" },
			caps:   vmm.Caps{KVM: true},
			want:   [][]string{{"-machine", "pc", "-accel", "tcg"}},
			// /dev/null is a character device, so it is opened as a file.
			transport: vmm.TransportVirtioSerial,
		},
		{
			// acpi=noirq only for one vCPU: with more it costs SMP.
			name:      "tcg, one vCPU",
			mutate:    func(s *vmm.Spec) { s.CPUs = 1 },
			want:      [][]string{{"-smp", "1"}, {"-append", "console=ttyS0 root=/dev/vda acpi=noirq"}},
			transport: vmm.TransportVirtioSerial,
		},
		{
			name:      "odd vm id is left out of -name",
			mutate:    func(s *vmm.Spec) { s.VMID = "a,b=c" },
			absent:    []string{"-name"},
			transport: vmm.TransportVirtioSerial,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := baseSpec(dir)
			if tt.mutate != nil {
				tt.mutate(&s)
			}
			if err := s.Validate(); err != nil {
				t.Fatal(err)
			}
			p, err := buildArgs(s, tt.caps)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range tt.want {
				if !hasSeq(p.args, w...) {
					t.Errorf("args lack %q:\n%q", w, p.args)
				}
			}
			for _, a := range tt.absent {
				for _, arg := range p.args {
					if strings.Contains(arg, a) {
						t.Errorf("args contain %q (in %q)", a, arg)
					}
				}
			}
			if p.transport != tt.transport {
				t.Errorf("transport = %q, want %q", p.transport, tt.transport)
			}
			if tt.opens != nil && !slices.Equal(p.opens, tt.opens) {
				t.Errorf("descriptors opened for QEMU:\n got %v\nwant %v", p.opens, tt.opens)
			}
		})
	}
}

// TestQMPClient checks the client against a scripted QMP peer: greeting,
// capabilities, events interleaved with a reply, and an error reply.
func TestQMPClient(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		w := func(s string) { _, _ = c.Write([]byte(s + "\n")) }
		w(`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}`)
		_, _ = r.ReadString('\n') // qmp_capabilities, id 1
		w(`{"return": {}, "id": 1}`)
		_, _ = r.ReadString('\n') // query-status, id 2
		w(`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}`)
		w(`{"return": {"status": "running", "singlestep": false, "running": true}, "id": 2}`)
		_, _ = r.ReadString('\n') // bogus, id 3
		w(`{"error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}, "id": 3}`)
		w(`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}`)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q, err := DialQMP(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	st, err := q.QueryStatus(ctx)
	if err != nil || !st.Running || st.Status != "running" {
		t.Fatalf("QueryStatus = %+v, %v", st, err)
	}
	err = q.Execute(ctx, "bogus", nil, nil)
	var qe *QMPError
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("Execute(bogus) = %v, want a CommandNotFound QMPError", err)
	}
	ev, err := q.WaitEvent(ctx, "SHUTDOWN")
	if err != nil || !strings.Contains(string(ev.Data), "guest-shutdown") {
		t.Fatalf("WaitEvent(SHUTDOWN) = %+v, %v", ev, err)
	}
	if evs := q.Events(); len(evs) != 1 || evs[0].Name != "RESUME" {
		t.Fatalf("Events = %+v, want the RESUME seen during query-status", evs)
	}
}

// TestConformanceQEMU boots the Debian cloud kernel with a busybox
// initramfs under real QEMU (TCG here) and runs the shared suite.
func TestConformanceQEMU(t *testing.T) {
	testutil.RequiresVM(t)
	kernel, modules := vmmtest.DebianKernel(t)
	initrd := vmmtest.BusyboxInitramfs(t, modules)
	vmmtest.RunConfig(t, vmmtest.Config{
		New: func() vmm.Monitor { return New() },
		Spec: func(t *testing.T) vmm.Spec {
			dir := t.TempDir()
			disk := filepath.Join(dir, "disk.img")
			if err := os.WriteFile(disk, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(disk, 16<<20); err != nil {
				t.Fatal(err)
			}
			return vmm.Spec{
				VMID: "01CONFORMANCE", Name: "conformance", CPUs: 1, MemoryMiB: 256,
				Kernel: kernel, Initrd: initrd, Cmdline: "console=ttyS0 panic=-1 loglevel=4",
				Disk: disk, RuntimeDir: filepath.Join(dir, "run"), ConsoleLog: filepath.Join(dir, "console.log"),
			}
		},
		Ready:        waitConsole(vmmtest.ReadyLine, 90*time.Second),
		WantGraceful: true, // the test guest powers off on the ACPI button
		Graceful:     20 * time.Second,
		Continued:    vmmtest.TicksContinue,
	})
}

func waitConsole(line string, timeout time.Duration) func(*testing.T, vmm.Spec, vmm.Handle) {
	return func(t *testing.T, spec vmm.Spec, _ vmm.Handle) {
		t.Helper()
		begin := time.Now()
		for time.Since(begin) < timeout {
			b, _ := os.ReadFile(spec.ConsoleLog)
			if strings.Contains(string(b), line) {
				t.Logf("guest ready after %v", time.Since(begin).Round(time.Millisecond))
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		b, _ := os.ReadFile(spec.ConsoleLog)
		t.Fatalf("no %q on the console after %v:\n%s", line, timeout, b)
	}
}

// BenchmarkStart measures Start (launch to QMP reporting the guest running,
// every device attached, guest boot excluded) followed by a hard stop.
func BenchmarkStart(b *testing.B) {
	testutil.RequiresVM(b)
	kernel, modules := vmmtest.DebianKernel(b)
	initrd := vmmtest.BusyboxInitramfs(b, modules)
	dir := b.TempDir()
	disk := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		b.Fatal(err)
	}
	m := New()
	spec := vmm.Spec{
		Name: "bench", CPUs: 1, MemoryMiB: 256, Kernel: kernel, Initrd: initrd, Cmdline: "console=ttyS0 panic=-1",
		Disk: disk, RuntimeDir: filepath.Join(dir, "run"), ConsoleLog: filepath.Join(dir, "console.log"),
	}
	var total time.Duration
	for b.Loop() {
		begin := time.Now()
		h, err := m.Start(context.Background(), spec)
		total += time.Since(begin)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := m.Stop(context.Background(), h, 0); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "start-ms/op")
}

func TestWithTCGKernelArgs(t *testing.T) {
	for in, want := range map[string]string{
		"console=ttyS0 root=/dev/vda":       "console=ttyS0 root=/dev/vda acpi=noirq",
		"":                                  "acpi=noirq",
		"console=ttyS0 acpi=off":            "console=ttyS0 acpi=off",
		"root=/dev/vda rw -- single acpi=x": "root=/dev/vda rw acpi=noirq -- single acpi=x",
		"-- single":                         "acpi=noirq -- single",
	} {
		if got := withTCGKernelArgs(in); got != want {
			t.Errorf("withTCGKernelArgs(%q) = %q, want %q", in, got, want)
		}
	}
}
