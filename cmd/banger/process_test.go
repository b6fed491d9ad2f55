package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
)

// bangerCmd runs the test binary as the banger program.
func bangerCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "BANGER_TEST_AS_MAIN=1")
	return cmd
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startDaemonProcess starts "banger daemon" as a subprocess on the dirs of cfg.
func startDaemonProcess(t *testing.T, stateDir, runtimeDir string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	cmd := bangerCmd("daemon", "--state-dir", stateDir, "--cache-dir", filepath.Join(filepath.Dir(stateDir), "cache"), "--runtime-dir", runtimeDir)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd, &logs
}

func TestDaemonProcessLifecycle(t *testing.T) {
	base := t.TempDir()
	state, run := filepath.Join(base, "state"), filepath.Join(base, "run")
	sock := filepath.Join(run, "banger.sock")
	cmd, logs := startDaemonProcess(t, state, run)
	waitFor(t, "the daemon socket", 10*time.Second, func() bool {
		_, err := os.Stat(sock)
		return err == nil
	})
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want 0660", fi.Mode().Perm())
	}

	// A client works.
	out, err := bangerCmd("--socket", sock, "vm", "ls", "-o", "json").Output()
	if err != nil || strings.TrimSpace(string(out)) != "[]" {
		t.Fatalf("vm ls through the daemon process: %q, %v", out, err)
	}

	// A second daemon on the same state dir refuses, naming the holder.
	second := bangerCmd("daemon", "--state-dir", state, "--runtime-dir", filepath.Join(base, "run2"))
	var secondErr bytes.Buffer
	second.Stderr = &secondErr
	err = second.Run()
	var ee *exec.ExitError
	if err == nil || !asExitErr(err, &ee) {
		t.Fatalf("second daemon: err %v, want a non-zero exit", err)
	}
	if want := "held by pid " + strconv.Itoa(cmd.Process.Pid); !strings.Contains(secondErr.String(), want) {
		t.Fatalf("second daemon's error lacks %q:\n%s", want, secondErr.String())
	}

	// SIGTERM: clean exit, socket removed.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("daemon exited with %v after SIGTERM; logs:\n%s", err, logs)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("daemon did not exit after SIGTERM; logs:\n%s", logs)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket %s still exists after SIGTERM: %v", sock, err)
	}
	if !strings.Contains(logs.String(), "banger daemon stopped") {
		t.Errorf("logs lack the stop line:\n%s", logs)
	}

	// The lock was released: a new daemon starts on the same state dir.
	cmd2, _ := startDaemonProcess(t, state, run)
	waitFor(t, "the restarted daemon socket", 10*time.Second, func() bool {
		_, err := os.Stat(sock)
		return err == nil
	})
	_ = cmd2.Process.Signal(syscall.SIGTERM)
}

// TestDaemonKilledLeavesStaleSocket: after kill -9 the socket file stays;
// the next daemon replaces it.
func TestDaemonRestartAfterKill9(t *testing.T) {
	base := t.TempDir()
	state, run := filepath.Join(base, "state"), filepath.Join(base, "run")
	sock := filepath.Join(run, "banger.sock")
	cmd, _ := startDaemonProcess(t, state, run)
	waitFor(t, "socket", 10*time.Second, func() bool { _, err := os.Stat(sock); return err == nil })
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("kill -9 should leave the socket file behind: %v", err)
	}
	_, _, code := runCLI(t, sock, "vm", "ls")
	if code != exitUnavailable {
		t.Fatalf("vm ls on a dead daemon's socket: exit %d, want %d", code, exitUnavailable)
	}
	cmd2, logs := startDaemonProcess(t, state, run)
	waitFor(t, "restarted daemon answering", 10*time.Second, func() bool {
		_, _, code := runCLI(t, sock, "vm", "ls")
		return code == 0
	})
	_ = cmd2.Process.Signal(syscall.SIGTERM)
	_ = logs
}

func asExitErr(err error, ee **exec.ExitError) bool {
	e, ok := err.(*exec.ExitError) //nolint:errorlint // Run returns it unwrapped
	*ee = e
	return ok
}

// TestPeerCredentials runs the CLI as a second uid: it sees and acts on its
// own VMs only, while root sees all. Access goes through the socket group.
func TestPeerCredentials(t *testing.T) {
	testutil.RequiresRoot(t)
	grp, err := user.LookupGroup("nogroup")
	if err != nil {
		testutil.Missing(t, testutil.TierRoot, "no 'nogroup' group to grant socket access: "+err.Error())
	}
	gid, _ := strconv.Atoi(grp.Gid)
	const uid = 65534
	s := daemontest.Start(t, func(c *cfgT) { c.SocketGroup = "nogroup" })
	st := s.D.Store()
	for _, v := range []struct {
		name string
		uid  uint32
	}{{"root-vm", 0}, {"nobody-vm", uid}} {
		// Runtime internals the API shows root only.
		rt := model.Runtime{RuntimeDir: "/run/banger/vms/id-" + v.name, Monitor: vmm.Handle{PID: 4242, Cmdline: []string{"qemu-system-x86_64", "-name", "secret-cmdline"}},
			Disk: blockdev.Disk{DMName: "banger-secret-dm", Loops: []model.LoopDev{{Device: "/dev/loop9", BackingFile: "/var/lib/banger/secret-loop"}}}}
		if err := st.CreateVM(&model.VM{ID: "id-" + v.name, Name: v.name, OwnerUID: v.uid, State: model.VMStopped, Created: time.Now(),
			Runtime: rt, Recovery: model.Recovery{Removed: []string{"qemu pid 4241 (sigkill)"}}}, netip.Prefix{}); err != nil {
			t.Fatal(err)
		}
	}
	fi, err := os.Stat(s.Config.Socket)
	if err != nil {
		t.Fatal(err)
	}
	if sgid := fi.Sys().(*syscall.Stat_t).Gid; int(sgid) != gid {
		t.Fatalf("socket group %d, want nogroup (%d)", sgid, gid)
	}

	// The test binary must be executable by the second uid.
	bin := filepath.Join(filepath.Dir(s.Config.StateDir), "banger.test")
	copyFile(t, os.Args[0], bin, 0o755)
	asNobody := func(args ...string) (string, string, int) {
		cmd := exec.Command(bin, append([]string{"--socket", s.Config.Socket}, args...)...)
		cmd.Env = []string{"BANGER_TEST_AS_MAIN=1", "HOME=/nonexistent", "PATH=/usr/bin:/bin"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uint32(gid)}}
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		code := 0
		if err != nil {
			var ee *exec.ExitError
			if !asExitErr(err, &ee) {
				t.Fatalf("run as uid %d: %v", uid, err)
			}
			code = ee.ExitCode()
		}
		return out.String(), errb.String(), code
	}

	out, errOut, code := asNobody("vm", "ls", "-o", "json")
	if code != 0 {
		t.Fatalf("vm ls as uid %d: exit %d: %s", uid, code, errOut)
	}
	var vms []api.VMSummary
	if err := json.Unmarshal([]byte(out), &vms); err != nil {
		t.Fatal(err)
	}
	if len(vms) != 1 || vms[0].Name != "nobody-vm" {
		t.Fatalf("uid %d sees %+v, want only nobody-vm", uid, vms)
	}
	if _, errOut, code := asNobody("vm", "inspect", "root-vm"); code != exitNotFound {
		t.Fatalf("uid %d inspecting root's VM: exit %d (%s), want not found", uid, code, errOut)
	}
	if _, _, code := asNobody("vm", "inspect", "nobody-vm"); code != 0 {
		t.Fatalf("uid %d inspecting its own VM: exit %d", uid, code)
	}
	// The owner's view holds no runtime internals (pids, command lines,
	// loop and dm names, what recovery removed); root's holds them.
	for _, args := range [][]string{{"vm", "inspect", "nobody-vm", "-o", "json"}, {"vm", "inspect", "nobody-vm"}} {
		out, errOut, code := asNobody(args...)
		if code != 0 {
			t.Fatalf("uid %d: banger %s: exit %d: %s", uid, strings.Join(args, " "), code, errOut)
		}
		for _, secret := range []string{"4242", "secret-cmdline", "banger-secret-dm", "/dev/loop9", "secret-loop", "4241", `"runtime"`, `"recovery"`} {
			if strings.Contains(out, secret) {
				t.Errorf("uid %d: banger %s shows %q, a runtime internal:\n%s", uid, strings.Join(args, " "), secret, out)
			}
		}
	}
	out, _, code = runCLI(t, s.Config.Socket, "vm", "inspect", "nobody-vm", "-o", "json")
	var rootView api.VM
	if err := json.Unmarshal([]byte(out), &rootView); err != nil || code != 0 {
		t.Fatalf("root: vm inspect nobody-vm: exit %d, %v: %s", code, err, out)
	}
	if rootView.Runtime == nil || rootView.Runtime.Monitor.PID != 4242 || rootView.Runtime.Disk.DMName != "banger-secret-dm" || rootView.Recovery == nil {
		t.Errorf("root's view of nobody-vm lacks the runtime internals: %s", out)
	}
	if _, errOut, code := asNobody("kernel", "rm", "x"); code != exitForbidden {
		t.Fatalf("uid %d removing a kernel: exit %d (%s), want forbidden", uid, code, errOut)
	}
	out, _, _ = asNobody("version", "-o", "json")
	if !strings.Contains(out, `"caller_uid": 65534`) {
		t.Fatalf("daemon did not see uid 65534 via SO_PEERCRED: %s", out)
	}

	// Root sees both.
	out, _, code = runCLI(t, s.Config.Socket, "vm", "ls", "-o", "json")
	if code != 0 {
		t.Fatal(code)
	}
	vms = nil
	_ = json.Unmarshal([]byte(out), &vms)
	if len(vms) != 2 {
		t.Fatalf("root sees %d VMs, want 2", len(vms))
	}
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
