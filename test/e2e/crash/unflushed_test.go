package crash

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// TestE2EUnflushedDiskNeverUsed checks that vm create no longer waits for
// its disk copy's fsync and that no half-written disk is ever used:
//   - normally the copy is flushed in the background and renamed to
//     disk.ext4; vm start uses that very file (same inode);
//   - the daemon SIGKILLed after create recorded the VM but before the
//     flush (failpoint create:unsynced) leaves only disk.ext4.unsynced;
//   - a host crash at that point (simulated: the unsynced copy's data
//     replaced by zeros, as lost page cache leaves it, and a new boot id)
//     likewise.
//
// In both crash cases start-up recovery removes the unsynced copy, the VM
// stays created, and its start copies the image again: the disk it boots
// is byte for byte the image and clean by e2fsck -fn. Nothing leaks.
func TestE2EUnflushedDiskNeverUsed(t *testing.T) {
	e := e2etest.FakeEnv(t, nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var img model.Image
	d.JSON(ctx, &img, "image", "inspect", e.Image)
	want := fileSHA(t, img.RootFS)
	create := func(name string) []string {
		return []string{"vm", "create", "--image", e.Image, "--name", name, "--memory", "256M", "--cpus", "1"}
	}
	diskOf := func(name string) string {
		vm := e2etest.Inspect(ctx, t, d, name)
		return filepath.Join(d.StateDir(), "vms", vm.ID, "disk.ext4")
	}

	// The normal path.
	d.MustCLI(ctx, create("flushed")...)
	disk := diskOf("flushed")
	deadline := time.Now().Add(time.Minute)
	for !exists(disk) {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear within a minute of vm create; daemon log:\n%s", disk, e2etest.Tail(d.Log(), 30))
		}
		time.Sleep(50 * time.Millisecond)
	}
	ino := inodeOf(t, disk)
	d.MustCLI(ctx, "vm", "start", "flushed", "--wait")
	if got := inodeOf(t, disk); got != ino || exists(disk+".unsynced") {
		t.Errorf("vm start did not boot the flushed copy: inode %d, flushed copy was %d; .unsynced exists %v", got, ino, exists(disk+".unsynced"))
	}
	if !strings.Contains(d.Log(), "disk flushed") {
		t.Error("the daemon log has no \"disk flushed\" line")
	}

	// The daemon killed between copy and flush, twice: the second time
	// the host "crashes" too.
	for _, name := range []string{"killed", "crashed"} {
		d.Stop()
		d.StartEnv(map[string]string{"BANGER_FAILPOINT": "create:unsynced"})
		before := len(d.Log())
		r := d.CLI(ctx, create(name)...)
		d.Kill()
		if !strings.Contains(d.Log()[before:], "failpoint create:unsynced reached") {
			t.Fatalf("vm create %s did not reach create:unsynced (exit %d: %s)", name, r.Code, r.Stderr)
		}
		// The daemon is dead: read its store as it left it.
		st, err := store.Open(filepath.Join(d.StateDir(), "banger.db"), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		vm, err := st.GetVM(name)
		_ = st.Close()
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(d.StateDir(), "vms", vm.ID, "disk.ext4")
		if vm.State != model.VMCreated || !vm.Runtime.Empty() {
			t.Errorf("VM %s after the kill: state %s, runtime %+v; want created, no runtime", name, vm.State, vm.Runtime)
		}
		if exists(p) || !exists(p+".unsynced") {
			t.Fatalf("VM %s after the kill: disk.ext4 exists %v, .unsynced exists %v; want only .unsynced", name, exists(p), exists(p+".unsynced"))
		}
		env := map[string]string{}
		if name == "crashed" {
			// What the page cache held is lost with the host: zeros
			// where the copy was (its size, metadata, reached the disk).
			f, err := os.OpenFile(p+".unsynced", os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			fi, _ := f.Stat()
			if _, err := io.CopyN(f, zeroReader{}, fi.Size()); err != nil {
				t.Fatal(err)
			}
			_ = f.Close()
			env["BANGER_TEST_BOOT_ID"] = "00000000-0000-4000-8000-0000000c4a5e"
		}
		before = len(d.Log())
		d.StartEnv(env)
		if exists(p) || exists(p+".unsynced") {
			t.Errorf("VM %s after start-up recovery: disk.ext4 exists %v, .unsynced exists %v; want neither", name, exists(p), exists(p+".unsynced"))
		}
		if !strings.Contains(d.Log()[before:], "removed a new disk copy whose flush had not finished") {
			t.Errorf("start-up recovery did not log removing %s.unsynced", p)
		}
		if vm := e2etest.Inspect(ctx, t, d, name); vm.State != model.VMCreated {
			t.Errorf("VM %s after start-up recovery is %s, want created", name, vm.State)
		}
		d.MustCLI(ctx, "vm", "start", name, "--wait")
		if got := fileSHA(t, p); got != want {
			t.Errorf("VM %s boots a disk that is not the image (sha256 %s, image %s)", name, got, want)
		}
		if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
			t.Errorf("e2fsck -fn of VM %s's disk: %v\n%s", name, err, out)
		}
	}
	for _, name := range []string{"flushed", "killed", "crashed"} {
		d.MustCLI(ctx, "vm", "rm", "--force", name)
	}
	e2etest.WithStore(t, d, func(_ *store.Store, recs []model.VM) {
		for _, s := range e2etest.Leaks(t, e, recs) {
			t.Errorf("after removing every VM: %s", s)
		}
	})
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

func inodeOf(t *testing.T, p string) uint64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

func fileSHA(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
