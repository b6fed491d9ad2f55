package snapshot

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// TestE2ESnapshotSecondUID: snapshots belong to their creator, through the
// socket with real uids (SO_PEERCRED). uid 65534 saves its own VM; uid
// 65533 does not see it in snapshot ls and gets "not found" (exit 3) from
// snapshot inspect and rm, vm clone and vm start --from-snapshot, and the
// snapshot is still there afterwards; neither sees root's snapshot; root
// sees both and clones the user's, and the owner's rm, refused while that
// clone runs from the files, does not name root's VM. VMs on the fake
// Firecracker.
func TestE2ESnapshotSecondUID(t *testing.T) {
	e := e2etest.FakeEnv(t, nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	// The socket and the CLI must let the two uids in: open the test's own
	// directories on the way to them (never anything above the run dir).
	run := e2etest.RunDir()
	if run == "" {
		t.Fatal("no e2e run directory")
	}
	for _, target := range []string{d.Socket, d.Bin} {
		for p := filepath.Dir(target); p == run || strings.HasPrefix(p, run+"/"); p = filepath.Dir(p) {
			if err := os.Chmod(p, 0o755); err != nil { //nolint:gosec // the test's own dirs
				t.Fatal(err)
			}
		}
	}
	if err := os.Chmod(d.Socket, 0o666); err != nil { //nolint:gosec // the test daemon's socket, reached by the second uids
		t.Fatal(err)
	}
	as := func(uid int, args ...string) e2etest.Result {
		t.Helper()
		home := filepath.Join(filepath.Dir(filepath.Dir(d.Socket)), "home-"+strconv.Itoa(uid))
		if err := os.MkdirAll(home, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(home, uid, uid); err != nil {
			t.Fatal(err)
		}
		c := exec.CommandContext(ctx, d.Bin, append([]string{"--socket", d.Socket}, args...)...) //nolint:gosec // test
		c.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + home, "BANGER_SSH_DIR=" + filepath.Join(home, "ssh")}
		c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
		var out, errb strings.Builder
		c.Stdout, c.Stderr = &out, &errb
		err := e2etest.Run(c)
		r := e2etest.Result{Stdout: out.String(), Stderr: errb.String()}
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			r.Code = ee.ExitCode()
		case err != nil:
			t.Fatalf("banger %v as uid %d did not run: %v", args, uid, err)
		}
		return r
	}
	must := func(uid int, args ...string) string {
		t.Helper()
		r := as(uid, args...)
		if r.Code != 0 {
			t.Fatalf("banger %v as uid %d: exit %d: %s", args, uid, r.Code, r.Stderr)
		}
		return r.Stdout
	}
	list := func(uid int) []string {
		t.Helper()
		var snaps []api.Snapshot
		if err := json.Unmarshal([]byte(must(uid, "snapshot", "ls", "-o", "json")), &snaps); err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, s := range snaps {
			names = append(names, s.Name)
		}
		return names
	}

	const owner, other = 65534, 65533
	must(owner, "vm", "create", "--image", e.Image, "--name", "mine", "--memory", "256M", "--cpus", "1")
	must(owner, "vm", "start", "mine", "--wait")
	must(owner, "vm", "snapshot", "mine", "usnap")
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "roots", "--memory", "256M", "--cpus", "1")
	d.MustCLI(ctx, "vm", "start", "roots", "--wait")
	d.MustCLI(ctx, "vm", "snapshot", "roots", "rsnap")

	if got := list(owner); !e2etest.SameSet(got, []string{"usnap"}) {
		t.Errorf("snapshot ls as its owner = %v, want [usnap]", got)
	}
	if got := list(other); len(got) != 0 {
		t.Errorf("snapshot ls as another uid = %v, want none", got)
	}
	if got := list(0); !e2etest.SameSet(got, []string{"usnap", "rsnap"}) {
		t.Errorf("snapshot ls as root = %v, want usnap and rsnap", got)
	}
	// The other uid needs a stopped VM of its own to restore into.
	must(other, "vm", "create", "--image", e.Image, "--name", "theirs", "--memory", "256M", "--cpus", "1")
	for _, tc := range []struct {
		uid  int
		args []string
	}{
		{other, []string{"snapshot", "inspect", "usnap"}},
		{other, []string{"snapshot", "rm", "usnap"}},
		{other, []string{"snapshot", "rm", "--force", "usnap"}},
		{other, []string{"vm", "clone", "usnap", "--name", "stolen"}},
		{other, []string{"vm", "start", "theirs", "--from-snapshot", "usnap"}},
		{owner, []string{"snapshot", "inspect", "rsnap"}},
		{owner, []string{"snapshot", "rm", "rsnap"}},
		{owner, []string{"vm", "clone", "rsnap", "--name", "stolen"}},
	} {
		r := as(tc.uid, tc.args...)
		if r.Code != 3 || !strings.Contains(r.Stderr, "not found") {
			t.Errorf("banger %v as uid %d: exit %d, stderr %q; want 3 (not found)", tc.args, tc.uid, r.Code, r.Stderr)
		}
	}
	if got := list(0); !e2etest.SameSet(got, []string{"usnap", "rsnap"}) {
		t.Errorf("snapshot ls as root after the refusals = %v, want usnap and rsnap", got)
	}
	if r := d.CLI(ctx, "vm", "inspect", "stolen"); r.Code == 0 {
		t.Errorf("a refused clone left a VM stolen")
	}
	var theirs api.VM
	if err := json.Unmarshal([]byte(must(other, "vm", "inspect", "theirs", "-o", "json")), &theirs); err != nil || theirs.State != "created" {
		t.Errorf("theirs after a refused restore: %s, %v; want created (untouched)", theirs.State, err)
	}
	// Root sees and inspects the user's snapshot, and may clone it.
	var snap api.Snapshot
	d.JSON(ctx, &snap, "snapshot", "inspect", "usnap")
	if snap.OwnerUID != owner || snap.SourceVM != "mine" {
		t.Errorf("snapshot inspect usnap as root: owner %d, source %q; want %d, mine", snap.OwnerUID, snap.SourceVM, owner)
	}
	d.MustCLI(ctx, "vm", "clone", "usnap", "--name", "rootclone")
	// The owner's rm is refused while root's clone runs from the files
	// (Firecracker maps its memory), without naming root's VM.
	if r := as(owner, "snapshot", "rm", "usnap"); r.Code != 4 || strings.Contains(r.Stderr, "rootclone") || !strings.Contains(r.Stderr, "a VM of another user") {
		t.Errorf("snapshot rm usnap as its owner while root's clone runs: exit %d, stderr %q; want 4 (in use), not naming rootclone", r.Code, r.Stderr)
	}
	d.MustCLI(ctx, "vm", "rm", "--force", "rootclone")
	// The owner removes its own.
	must(owner, "vm", "rm", "--force", "mine")
	must(owner, "snapshot", "rm", "usnap")
	if got := list(0); !e2etest.SameSet(got, []string{"rsnap"}) {
		t.Errorf("snapshot ls as root after the owner's rm = %v, want rsnap", got)
	}
	must(other, "vm", "rm", "theirs")
	d.MustCLI(ctx, "vm", "rm", "--force", "roots")
	d.MustCLI(ctx, "snapshot", "rm", "rsnap")
	e2etest.AssertNoVMResources(t, e, true)
}
