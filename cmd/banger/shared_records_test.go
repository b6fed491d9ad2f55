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
