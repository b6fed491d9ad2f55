package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
)

// TestMain lets the test binary run as the banger program itself, so that
// subprocess tests exercise the real main (signals, exit codes).
func TestMain(m *testing.M) {
	if os.Getenv("BANGER_TEST_AS_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runCLI runs the banger CLI in-process against socket and returns its
// stdout, stderr and exit code.
func runCLI(t *testing.T, socket string, args ...string) (string, string, int) {
	t.Helper()
	cmd := newRootCmd()
	var out, errb bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	cmd.SetArgs(append([]string{"--socket", socket}, args...))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := cmd.ExecuteContext(ctx)
	code := 0
	if err != nil {
		code = exitCode(err)
		var ee exitError
		if !asExit(err, &ee) {
			errb.WriteString(errorLine(err) + "\n")
		}
	}
	return out.String(), errb.String(), code
}

func asExit(err error, ee *exitError) bool {
	e, ok := err.(exitError) //nolint:errorlint // exitError is never wrapped
	if ok {
		*ee = e
	}
	return ok
}

func seed(t *testing.T, s *daemontest.Started) {
	t.Helper()
	st := s.D.Store()
	if _, err := st.PutImage(model.Image{ID: "img-1", Name: "debian-bookworm", Source: "oci", Ref: "docker.io/library/debian:bookworm",
		Dir: filepath.Join(s.Config.ImagesDir(), "img-1"), RootFS: filepath.Join(s.Config.ImagesDir(), "img-1", "rootfs.ext4"), Size: 1 << 30,
		Kernel: "generic-6.1", Managed: true, Created: time.Now()}, false); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(s.Config.ImagesDir(), "img-1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.Config.ImagesDir(), "img-1", "rootfs.ext4"), make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := st.PutKernel(model.Kernel{Name: "generic-6.1", Version: "6.1.0-1-cloud-amd64", Format: "bzImage", Source: "import",
		Dir: filepath.Join(s.Config.KernelsDir(), "generic-6.1"), Created: time.Now()}, false); err != nil {
		t.Fatal(err)
	}
	if err := st.PutKernel(model.Kernel{Name: "spare", Version: "6.1", Format: "vmlinux", Source: "import", Created: time.Now()}, false); err != nil {
		t.Fatal(err)
	}
	for _, v := range []struct {
		name string
		uid  uint32
	}{{"rootvm", uint32(os.Geteuid())}, {"alice-vm", 4242}} {
		vm := &model.VM{ID: "id-" + v.name, Name: v.name, OwnerUID: v.uid, Image: "debian-bookworm", ImageID: "img-1",
			Kernel: "generic-6.1", State: model.VMStopped, VMM: "qemu", DiskDriver: "copy", CPUs: 1, MemoryMiB: 512, Created: time.Now()}
		if err := st.CreateVM(vm, netip.MustParsePrefix("172.30.0.0/24")); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCLIRoundTrips(t *testing.T) {
	s := daemontest.Start(t, nil)
	seed(t, s)
	sock := s.Config.Socket

	// The test runs as root (CI) or as a normal user: the caller's VM is
	// "rootvm"; "alice-vm" belongs to uid 4242, visible to root only; only
	// root removes kernels and images.
	root := os.Geteuid() == 0
	pick := func(asRoot, asUser int) int {
		if root {
			return asRoot
		}
		return asUser
	}
	lsWant := []string{"rootvm", "stopped", "172.30.0."}
	if root {
		lsWant = append(lsWant, "alice-vm")
	}
	tests := []struct {
		args     []string
		code     int
		contains []string // in stdout
		errHas   string   // in stderr
	}{
		{args: []string{"version"}, contains: []string{"client:", "daemon:", "schema " + strconv.Itoa(store.CurrentSchema)}},
		{args: []string{"image", "ls"}, contains: []string{"debian-bookworm", "oci", "1.0 GiB", "generic-6.1"}},
		{args: []string{"image", "inspect", "debian-bookworm"}, contains: []string{"rootfs:", "rootfs.ext4", "docker.io/library/debian:bookworm"}},
		{args: []string{"image", "inspect", "nope"}, code: exitNotFound, errHas: `image "nope": not found`},
		{args: []string{"kernel", "ls"}, contains: []string{"generic-6.1", "6.1.0-1-cloud-amd64", "bzImage", "spare"}},
		{args: []string{"kernel", "inspect", "generic-6.1"}, contains: []string{"version:", "6.1.0-1-cloud-amd64"}},
		{args: []string{"kernel", "rm", "generic-6.1"}, code: pick(exitConflict, exitForbidden), errHas: map[bool]string{true: "is used by image debian-bookworm", false: "needs root"}[root]},
		{args: []string{"kernel", "rm", "spare"}, code: pick(0, exitForbidden), errHas: map[bool]string{true: "removed kernel spare", false: "needs root"}[root]},
		{args: []string{"kernel", "inspect", "spare"}, code: pick(exitNotFound, 0)},
		{args: []string{"vm", "ls"}, contains: lsWant},
		{args: []string{"vm", "inspect", "rootvm"}, contains: []string{"state:", "stopped", "vmm:", "qemu"}},
		{args: []string{"vm", "inspect", "alice-vm"}, code: pick(0, exitNotFound)},
		{args: []string{"vm", "inspect", "ghost"}, code: exitNotFound},
		{args: []string{"image", "rm", "debian-bookworm"}, code: pick(exitConflict, exitForbidden), errHas: map[bool]string{true: "is used by VM(s)", false: "needs root"}[root]},
		{args: []string{"image", "rm", "--force", "debian-bookworm"}, code: pick(0, exitForbidden), errHas: map[bool]string{true: "removed image debian-bookworm", false: "needs root"}[root]},
		{args: []string{"image", "ls", "-o", "yaml"}, code: exitInvalid, errHas: "unknown output format"},
		{args: []string{"image", "inspect"}, code: exitInvalid, errHas: "expected an image name"},
		{args: []string{"completion", "bash"}, contains: []string{"bash completion"}},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, errOut, code := runCLI(t, sock, tc.args...)
			if code != tc.code {
				t.Fatalf("banger %v: exit %d, want %d\nstdout: %s\nstderr: %s", tc.args, code, tc.code, out, errOut)
			}
			for _, c := range tc.contains {
				if !strings.Contains(out, c) {
					t.Errorf("banger %v: stdout lacks %q:\n%s", tc.args, c, out)
				}
			}
			if tc.errHas != "" && !strings.Contains(errOut, tc.errHas) {
				t.Errorf("banger %v: stderr lacks %q:\n%s", tc.args, tc.errHas, errOut)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(s.Config.ImagesDir(), "img-1")); root && !os.IsNotExist(err) {
		t.Errorf("image rm left its dir behind: %v", err)
	}
}

func TestCLIJSON(t *testing.T) {
	s := daemontest.Start(t, nil)
	seed(t, s)
	for _, args := range [][]string{
		{"image", "ls"}, {"image", "inspect", "debian-bookworm"}, {"kernel", "ls"}, {"kernel", "inspect", "spare"},
		{"vm", "ls"}, {"vm", "inspect", "rootvm"}, {"version"},
	} {
		out, errOut, code := runCLI(t, s.Config.Socket, append(args, "-o", "json")...)
		if code != 0 {
			t.Fatalf("banger %v -o json: exit %d: %s", args, code, errOut)
		}
		var v any
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("banger %v -o json: not JSON: %v\n%s", args, err, out)
		}
	}
	out, _, _ := runCLI(t, s.Config.Socket, "image", "inspect", "debian-bookworm", "-o", "json")
	var img map[string]any
	_ = json.Unmarshal([]byte(out), &img)
	for _, k := range []string{"name", "id", "ref", "rootfs", "size", "kernel", "created"} {
		if _, ok := img[k]; !ok {
			t.Errorf("image inspect -o json lacks %q: %s", k, out)
		}
	}
}

func TestCLIDaemonNotRunning(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	_, errOut, code := runCLI(t, sock, "vm", "ls")
	if code != exitUnavailable {
		t.Fatalf("exit %d, want %d; stderr %s", code, exitUnavailable, errOut)
	}
	for _, want := range []string{"daemon is not running", "sudo banger daemon", sock} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q: %s", want, errOut)
		}
	}
}

func TestDoctorJSON(t *testing.T) {
	out, errOut, code := runCLI(t, filepath.Join(t.TempDir(), "x.sock"), "doctor", "-o", "json", "--state-dir", t.TempDir(), "--cache-dir", t.TempDir())
	var checks []struct {
		Check, Status, Detail string
	}
	if err := json.Unmarshal([]byte(out), &checks); err != nil {
		t.Fatalf("doctor -o json: %v\n%s\n%s", err, out, errOut)
	}
	names := map[string]bool{}
	for _, c := range checks {
		names[c.Check] = true
	}
	for _, want := range []string{"kvm", "firecracker", "qemu", "e2fsprogs", "debugfs", "tun", "bridge", "loop", "device-mapper", "vhost-vsock", "nftables", "ip_forward", "state-dir space", "cache-dir space", "daemon"} {
		if !names[want] {
			t.Errorf("doctor lacks check %q", want)
		}
	}
	_ = code
	_ = fmt.Sprint
}
