package main

import (
	"bytes"
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

	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/testutil"
)

// secondUser is a daemon whose socket uid 65534 may use, and a way to run
// the CLI as that uid.
type secondUser struct {
	s      *daemontest.Started
	bin    string
	gid    int
	sshDir string
}

const nobodyUID = 65534

func newSecondUser(t *testing.T, mutate func(*cfgT)) *secondUser {
	t.Helper()
	testutil.RequiresRoot(t)
	grp, err := user.LookupGroup("nogroup")
	if err != nil {
		testutil.Missing(t, testutil.TierRoot, "no 'nogroup' group to grant socket access: "+err.Error())
	}
	gid, _ := strconv.Atoi(grp.Gid)
	s := daemontest.Start(t, func(c *cfgT) {
		c.SocketGroup = "nogroup"
		if mutate != nil {
			mutate(c)
		}
	})
	bin := filepath.Join(filepath.Dir(s.Config.StateDir), "banger.test")
	copyFile(t, os.Args[0], bin, 0o755)
	sshDir := filepath.Join(filepath.Dir(s.Config.StateDir), "nobody-ssh")
	if err := os.Mkdir(sshDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sshDir, nobodyUID, gid); err != nil {
		t.Fatal(err)
	}
	return &secondUser{s: s, bin: bin, gid: gid, sshDir: sshDir}
}

// run runs the CLI as uid 65534 and returns stdout, stderr and the exit code.
func (u *secondUser) run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(u.bin, append([]string{"--socket", u.s.Config.Socket}, args...)...)
	cmd.Env = []string{"BANGER_TEST_AS_MAIN=1", "HOME=/nonexistent", "PATH=/usr/bin:/bin", "BANGER_SSH_DIR=" + u.sshDir}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobodyUID, Gid: uint32(u.gid)}}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !asExitErr(err, &ee) {
			t.Fatalf("run as uid %d: %v", nobodyUID, err)
		}
		code = ee.ExitCode()
	}
	return out.String(), errb.String(), code
}

// rootImage records an image owned by root, with a small root file system.
func rootImage(t *testing.T, s *daemontest.Started, id, name string) model.Image {
	t.Helper()
	dir := filepath.Join(s.Config.ImagesDir(), id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	rootfs := filepath.Join(dir, "rootfs.ext4")
	if err := os.WriteFile(rootfs, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(rootfs, 8<<20); err != nil {
		t.Fatal(err)
	}
	img := model.Image{ID: id, Name: name, Source: "oci", Dir: dir, RootFS: rootfs, Size: 8 << 20, Kernel: "k", Created: time.Now()}
	if _, err := s.D.Store().PutImage(img, false); err != nil {
		t.Fatal(err)
	}
	return img
}

// TestIDNamedRecordsRefused: ids are visible to every local user, so a VM
// or an image named like another record's id would be taken for it. A
// second uid asking for such a name through the socket is refused, and
// the victim's records are untouched.
func TestIDNamedRecordsRefused(t *testing.T) {
	u := newSecondUser(t, nil)
	st := u.s.D.Store()
	img := rootImage(t, u.s, "aaaaaaaaaaaaaaaaaaaaaaaa", "base")
	victim := &model.VM{ID: "0123456789abcdef01234567", Name: "victim", OwnerUID: 0, Image: img.Name, ImageID: img.ID, State: model.VMStopped, Created: time.Now()}
	if err := st.CreateVM(victim, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"vm", "create", "--image", "base", "--name", victim.ID},
		{"vm", "create", "--image", "base", "--name", "ffffffffffffffffffffffff"},
		{"image", "pull", "--name", img.ID, "127.0.0.1:1/x:y"},
	} {
		if _, errOut, code := u.run(t, args...); code != exitInvalid || !strings.Contains(errOut, "form of an id") {
			t.Errorf("uid %d: banger %s: exit %d (%s), want invalid input naming the id form", nobodyUID, strings.Join(args, " "), code, strings.TrimSpace(errOut))
		}
	}
	if got, err := st.GetVM(victim.ID); err != nil || got.Name != "victim" {
		t.Fatalf("victim's VM after the attempts: %+v, %v", got, err)
	}
	if got, err := st.GetImage(img.ID); err != nil || got.Name != "base" {
		t.Fatalf("root's image after the attempts: %+v, %v", got, err)
	}
}

// TestForcePullOverAnothersImage: image rm is root's, and so is replacing
// (and so deleting) root's image with pull --force. The refusal comes
// before any download.
func TestForcePullOverAnothersImage(t *testing.T) {
	u := newSecondUser(t, nil)
	rootImage(t, u.s, "aaaaaaaaaaaaaaaaaaaaaaaa", "shared")
	_, errOut, code := u.run(t, "image", "pull", "--force", "--name", "shared", "127.0.0.1:1/x:y")
	if code != exitForbidden {
		t.Fatalf("uid %d: image pull --force over root's image: exit %d (%s), want forbidden", nobodyUID, code, strings.TrimSpace(errOut))
	}
	if got, err := u.s.D.Store().GetImage("shared"); err != nil || got.ID != "aaaaaaaaaaaaaaaaaaaaaaaa" {
		t.Fatalf("root's image after the attempt: %+v, %v", got, err)
	}
}

// TestPerUserLimits: over a configured per-user limit, create answers
// forbidden naming the limit; sizes over the per-VM bounds are invalid.
func TestPerUserLimits(t *testing.T) {
	u := newSecondUser(t, func(c *cfgT) {
		c.Limits.VMs = 1
		c.Limits.VMMemory = "2G"
		c.Limits.VMDisk = "1G"
		c.Limits.VMCPUs = 4
	})
	rootImage(t, u.s, "aaaaaaaaaaaaaaaaaaaaaaaa", "base")
	held := &model.VM{ID: "0123456789abcdef01234567", Name: "mine", OwnerUID: nobodyUID, CPUs: 1, MemoryMiB: 512, DiskBytes: 8 << 20, State: model.VMStopped, Created: time.Now()}
	if err := u.s.D.Store().CreateVM(held, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"vm", "create", "--image", "base", "--name", "second"}, exitForbidden, "limit vms is 1"},
		{[]string{"vm", "create", "--image", "base", "--name", "big", "--memory", "4G"}, exitInvalid, "limits.vm_memory"},
		{[]string{"vm", "create", "--image", "base", "--name", "big", "--disk", "2G"}, exitInvalid, "limits.vm_disk"},
		{[]string{"vm", "create", "--image", "base", "--name", "big", "--cpus", "8"}, exitInvalid, "limits.vm_cpus"},
	} {
		if _, errOut, code := u.run(t, c.args...); code != c.code || !strings.Contains(errOut, c.want) {
			t.Errorf("uid %d: banger %s: exit %d (%s), want exit %d naming %q", nobodyUID, strings.Join(c.args, " "), code, strings.TrimSpace(errOut), c.code, c.want)
		}
	}
	vms, _ := u.s.D.Store().ListVMs(nil)
	if len(vms) != 1 {
		t.Fatalf("%d VMs after the refused creates, want 1", len(vms))
	}
}

// TestVMsDirPrivate: another user can neither list the VMs dir (whose
// entries are VM ids) nor enter a VM's dir (disk, console).
func TestVMsDirPrivate(t *testing.T) {
	u := newSecondUser(t, nil)
	vmDir := filepath.Join(u.s.Config.VMsDir(), "0123456789abcdef01234567")
	if err := os.MkdirAll(vmDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{u.s.Config.VMsDir(), vmDir} {
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm() != 0o700 {
			t.Fatalf("%s: mode %v, %v; want 0700", p, fi.Mode().Perm(), err)
		}
	}
	cmd := exec.Command("/bin/ls", u.s.Config.VMsDir())
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobodyUID, Gid: uint32(u.gid)}}
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Fatalf("uid %d listed the VMs dir: %s", nobodyUID, out)
	}
}
