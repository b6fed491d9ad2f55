package qemu

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

// procStatus returns the named fields of /proc/<pid>/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		out[k] = strings.Join(strings.Fields(v), " ")
	}
	return out
}

// TestSandboxedMonitor boots a real QEMU guest (TCG) as uid/gid 65534,
// with every file of the daemon's (kernel, initrd, disk, console log,
// runtime dir) unreadable by that user: QEMU runs only on the descriptors
// it was given. /proc/<pid>/status shows the unprivileged ids, no
// supplementary groups, no capabilities and seccomp filter mode; a spawn
// that the sandbox denies (QMP migrate to an exec: URI, which forks) is
// refused. The console, followed by the daemon, stays within its cap.
func TestSandboxedMonitor(t *testing.T) {
	testutil.RequiresVM(t)
	kernel, modules := vmmtest.DebianKernel(t)
	initrd := vmmtest.BusyboxInitramfs(t, modules)
	dir := t.TempDir() // 0700, root's: the QEMU user cannot reach into it
	private := func(src, name string) string {
		b, err := os.ReadFile(src) //nolint:gosec // test fixtures
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	disk := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	const capBytes = 8 << 10
	spec := vmm.Spec{
		VMID: "01SANDBOX", Name: "sandbox", CPUs: 1, MemoryMiB: 256,
		Kernel: private(kernel, "vmlinuz"), Initrd: private(initrd, "initrd"), Cmdline: "console=ttyS0 panic=-1 loglevel=7",
		Disk: disk, RuntimeDir: filepath.Join(dir, "run"), ConsoleLog: filepath.Join(dir, "console.log"),
		RunAs: &vmm.Credential{UID: 65534, GID: 65534}, ConsoleLogMax: capBytes,
	}
	m := New()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	h, err := m.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })

	st := procStatus(t, h.PID)
	for k, want := range map[string]string{
		"Uid": "65534 65534 65534 65534", "Gid": "65534 65534 65534 65534", "Groups": "",
		"CapEff": "0000000000000000", "CapPrm": "0000000000000000", "Seccomp": "2",
	} {
		if st[k] != want {
			t.Errorf("/proc/%d/status %s: %q, want %q", h.PID, k, st[k], want)
		}
	}

	// The guest boots on the descriptors alone.
	waitConsole(vmmtest.ReadyLine, 90*time.Second)(t, spec, h)

	// spawn=deny: QEMU may not fork. A migration to an exec: URI forks a
	// shell; the seccomp filter kills QEMU at the fork (SIGSYS), so no
	// child ever runs.
	q, err := DialQMP(ctx, h.APISocket)
	if err != nil {
		t.Fatal(err)
	}
	escaped := filepath.Join(dir, "escaped")
	err = q.Execute(ctx, "migrate", map[string]any{"uri": "exec:cat > " + escaped}, nil)
	q.Close()
	if !vmm.WaitGone(ctx, h, 10*time.Second) {
		t.Fatalf("QEMU still runs after a spawn the sandbox denies (migrate: %v)", err)
	}
	if _, serr := os.Stat(escaped); serr == nil {
		t.Fatalf("QEMU ran a child process under spawn=deny")
	}

	for _, p := range []string{spec.ConsoleLog, spec.ConsoleLog + ".1"} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatalf("console log %s: %v (the boot log is larger than the %d-byte cap, so it must have rotated)", p, err, capBytes)
		}
		if fi.Size() > capBytes+4096 {
			t.Errorf("console log %s is %d bytes, cap %d", p, fi.Size(), capBytes)
		}
	}
}
