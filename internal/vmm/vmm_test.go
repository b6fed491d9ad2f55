package vmm

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"
	"time"

	"golang.org/x/sys/unix"
)

func TestSelect(t *testing.T) {
	fc, qemu := "/usr/bin/firecracker", "/usr/bin/qemu-system-x86_64"
	tests := []struct {
		pref     string
		caps     Caps
		want     string
		wantErr  error
		inReason string
	}{
		{"auto", Caps{FirecrackerPath: fc, QEMUPath: qemu, KVM: true}, "firecracker", nil, "hardware KVM"},
		{"", Caps{FirecrackerPath: fc, QEMUPath: qemu, KVM: false, KVMReason: "the CPU exposes no vmx/svm flag"}, "qemu", nil, "vmx/svm"},
		{"auto", Caps{QEMUPath: qemu, KVM: true}, "qemu", nil, "not installed"},
		{"auto", Caps{KVM: true}, "", ErrNotSupported, ""},
		{"firecracker", Caps{FirecrackerPath: fc, KVM: false, KVMReason: "no kvm"}, "", ErrNotSupported, ""},
		{"firecracker", Caps{QEMUPath: qemu, KVM: true}, "", ErrNotSupported, ""},
		{"firecracker", Caps{FirecrackerPath: fc, KVM: true}, "firecracker", nil, "requested"},
		{"qemu", Caps{QEMUPath: qemu}, "qemu", nil, "requested"},
		{"qemu", Caps{}, "", ErrNotSupported, ""},
		{"cloud-hypervisor", Caps{QEMUPath: qemu}, "", ErrUnknownMonitor, ""},
	}
	for _, tt := range tests {
		got, reason, err := selectWith(tt.pref, tt.caps)
		if got != tt.want || !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) || !strings.Contains(reason, tt.inReason) {
			t.Errorf("selectWith(%q, %+v) = %q, %q, %v; want %q, reason with %q, error %v", tt.pref, tt.caps, got, reason, err, tt.want, tt.inReason, tt.wantErr)
		}
	}
}

func TestSpecValidate(t *testing.T) {
	good := func() Spec {
		return Spec{Name: "v", CPUs: 1, MemoryMiB: 128, Kernel: "/k", RuntimeDir: "/run/v", ConsoleLog: "/run/v/c.log"}
	}
	s := good()
	if err := s.Validate(); err != nil {
		t.Fatalf("Validate(good) = %v", err)
	}
	if s.AgentSocket != "/run/v/agent.sock" || s.VsockCID != 3 {
		t.Errorf("defaults not filled: agent socket %q, cid %d", s.AgentSocket, s.VsockCID)
	}
	bad := map[string]func(*Spec){
		"no cpus":          func(s *Spec) { s.CPUs = 0 },
		"tiny memory":      func(s *Spec) { s.MemoryMiB = 1 },
		"no kernel":        func(s *Spec) { s.Kernel = "" },
		"relative kernel":  func(s *Spec) { s.Kernel = "vmlinuz" },
		"newline in disk":  func(s *Spec) { s.Disk = "/a\nb" },
		"cmdline newline":  func(s *Spec) { s.Cmdline = "a\nb" },
		"tap with slash":   func(s *Spec) { s.Tap = "a/b" },
		"tap with comma":   func(s *Spec) { s.Tap = "a,b" },
		"tap too long":     func(s *Spec) { s.Tap = "abcdefghijklmnop" },
		"bad mac":          func(s *Spec) { s.MAC = "06:00:0a:00:00" },
		"mac with options": func(s *Spec) { s.MAC = "06:00:0a:00:00:02,id=x" },
		"cid 2":            func(s *Spec) { s.VsockCID = 2 },
		"long agent sock":  func(s *Spec) { s.AgentSocket = "/" + strings.Repeat("a", 120) },
		"bad accel":        func(s *Spec) { s.Accel = "hvf" },
	}
	for name, mutate := range bad {
		s := good()
		mutate(&s)
		if err := s.Validate(); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("%s: Validate = %v, want ErrInvalidSpec", name, err)
		}
	}
}

// TestProcStatOddComm runs a program whose name has spaces and parentheses,
// which naive /proc/<pid>/stat parsing gets wrong.
func TestProcStatOddComm(t *testing.T) {
	testutil.RequiresTool(t, "sleep")
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	odd := filepath.Join(t.TempDir(), "a) (b c")
	if err := os.Symlink(sleep, odd); err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(t.TempDir(), "log")
	p, err := StartDetached(exec.Command(odd, "30"), log)
	if err != nil {
		t.Fatal(err)
	}
	h := p.Handle
	alive, err := Alive(h)
	if err != nil || !alive {
		now, ierr := Identify(h.PID)
		t.Fatalf("Alive = %v, %v; want true\nstarted as %+v\nnow       %+v (%v)", alive, err, h, now, ierr)
	}
	// setsid: the child leads its own session.
	if sid, err := unix.Getsid(h.PID); err != nil || sid != h.PID {
		t.Errorf("session of pid %d = %d, %v; want its own", h.PID, sid, err)
	}
	how, err := Terminate(context.Background(), h, time.Second)
	if err != nil || how != StoppedTerm {
		t.Fatalf("Terminate = %q, %v; want sigterm", how, err)
	}
	select {
	case <-p.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("child not reaped")
	}
	if alive, _ := Alive(h); alive {
		t.Fatal("Alive after Terminate")
	}
	if err := Signal(h, 0); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("Signal after exit = %v, want ErrNotRunning", err)
	}
}

func TestRemoveSocketRefusesFiles(t *testing.T) {
	f := filepath.Join(t.TempDir(), "not-a-socket")
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := RemoveSocket(f); err == nil {
		t.Fatal("RemoveSocket removed a regular file")
	}
	if _, err := os.Stat(f); err != nil {
		t.Fatalf("file gone: %v", err)
	}
	if err := RemoveSocket(filepath.Join(t.TempDir(), "absent")); err != nil {
		t.Fatalf("RemoveSocket(absent) = %v", err)
	}
}

func TestEnsureUserRefusesRoot(t *testing.T) {
	for _, name := range []string{"root", "Bad Name", "", "a/b"} {
		if _, err := EnsureUser(name); err == nil {
			t.Errorf("EnsureUser(%q) accepted", name)
		}
	}
	c, err := EnsureUser("nobody")
	if err != nil {
		t.Fatalf("EnsureUser(nobody): %v", err)
	}
	if c.UID == 0 || c.GID == 0 {
		t.Fatalf("EnsureUser(nobody) = %+v", c)
	}
}
