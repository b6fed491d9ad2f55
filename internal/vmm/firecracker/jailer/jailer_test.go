package jailer

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"
)

// TestInvocationFollowsContract: banger's command line has the jailer's
// documented shape (required flags first, --new-pid-ns, no --daemonize,
// "--" then Firecracker's arguments without --id), and reads back the same.
func TestInvocationFollowsContract(t *testing.T) {
	c := Config{UID: 900, GID: 900, ChrootBase: "/var/lib/banger/jail", Cgroups: []string{"cpu.max=50000 100000"}}
	inv, err := c.Invocation("0123456789abcdef01234567", "/usr/bin/firecracker", 512, []string{"--api-sock", APISocket})
	if err != nil {
		t.Fatal(err)
	}
	args := inv.Args()
	want := []string{"--id", "0123456789abcdef01234567", "--exec-file", "/usr/bin/firecracker", "--uid", "900", "--gid", "900",
		"--parent-cgroup", "banger", "--cgroup-version", "2", "--cgroup", "memory.max=671088640", "--cgroup", "cpu.max=50000 100000",
		"--chroot-base-dir", "/var/lib/banger/jail", "--new-pid-ns", "--", "--api-sock", "/run/fc.sock"}
	if !slices.Equal(args, want) {
		t.Fatalf("args =\n%q\nwant\n%q", args, want)
	}
	back, err := Parse(args)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(back.Args(), args) {
		t.Fatalf("Parse(Args()) = %q", back.Args())
	}
	if got := inv.ChrootDir(); got != "/var/lib/banger/jail/firecracker/0123456789abcdef01234567/root" {
		t.Errorf("ChrootDir = %s", got)
	}
	if got := inv.PIDFile(); got != inv.ChrootDir()+"/firecracker.pid" {
		t.Errorf("PIDFile = %s", got)
	}
	v1, _ := Config{UID: 9, GID: 9, ChrootBase: "/j", CgroupVersion: 1}.Invocation("a", "/bin/firecracker", 128, nil)
	if !slices.Contains(v1.Cgroups, "memory.limit_in_bytes=268435456") {
		t.Errorf("cgroup v1 memory limit missing: %q", v1.Cgroups)
	}
}

func TestConfigRefuses(t *testing.T) {
	for name, c := range map[string]Config{
		"uid 0":          {UID: 0, GID: 9, ChrootBase: "/j"},
		"gid 0":          {UID: 9, GID: 0, ChrootBase: "/j"},
		"no base":        {UID: 9, GID: 9},
		"relative base":  {UID: 9, GID: 9, ChrootBase: "j"},
		"unclean base":   {UID: 9, GID: 9, ChrootBase: "/j/../k"},
		"bad cgroup":     {UID: 9, GID: 9, ChrootBase: "/j", Cgroups: []string{"memory.max"}},
		"cgroup newline": {UID: 9, GID: 9, ChrootBase: "/j", Cgroups: []string{"memory.max=1\nx"}},
	} {
		if _, err := c.Invocation("vm", "/bin/firecracker", 128, nil); !errors.Is(err, ErrContract) {
			t.Errorf("%s: Invocation = %v, want ErrContract", name, err)
		}
	}
	for name, id := range map[string]string{"empty": "", "65 chars": strings.Repeat("a", 65), "slash": "a/b", "dot": "a.b", "space": "a b"} {
		if _, err := (Config{UID: 9, GID: 9, ChrootBase: "/j"}).Invocation(id, "/bin/firecracker", 128, nil); !errors.Is(err, ErrContract) {
			t.Errorf("id %s: Invocation = %v, want ErrContract", name, err)
		}
	}
	if _, err := (Config{UID: 9, GID: 9, ChrootBase: "/j"}).Invocation(strings.Repeat("a", 64), "/bin/firecracker", 128, nil); err != nil {
		t.Errorf("a 64-character id: %v", err)
	}
	if _, err := (Config{UID: 9, GID: 9, ChrootBase: "/j"}).Invocation("vm", "/bin/firecracker", 128, []string{"--id=x"}); !errors.Is(err, ErrContract) {
		t.Errorf("--id among Firecracker's arguments: %v", err)
	}
}

// TestPrepareAndRemove builds a jail and tears it down (root: chown and
// mknod), and checks that Remove and Stale refuse dirs without banger's
// marker and leave them untouched.
func TestPrepareAndRemove(t *testing.T) {
	testutil.RequiresRoot(t)
	dir, err := os.MkdirTemp("/tmp", "bjt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	kernel, disk := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "disk")
	_ = os.WriteFile(kernel, []byte("k"), 0o644)
	_ = os.WriteFile(disk, []byte("d"), 0o600)
	base := filepath.Join(dir, "jail")
	inv, err := Config{UID: 65534, GID: 65534, ChrootBase: base}.Invocation("vm-1", "/usr/bin/firecracker", 128, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := Prepare(inv, kernel, "", disk); err != nil {
		t.Fatal(err)
	}
	for p, wantUID := range map[string]int{KernelPath: 0, DiskName: 65534, RunDir: 65534} {
		fi, err := os.Lstat(inv.HostPath(p))
		if err != nil {
			t.Fatal(err)
		}
		if uid := int(fi.Sys().(*syscall.Stat_t).Uid); uid != wantUID {
			t.Errorf("%s in the chroot is uid %d's, want %d's", p, uid, wantUID)
		}
	}
	// A world-readable kernel is linked, the disk is linked (same inode).
	ki, _ := os.Stat(kernel)
	ji, _ := os.Stat(inv.HostPath(KernelPath))
	if !os.SameFile(ki, ji) {
		t.Error("the world-readable kernel was copied, not linked")
	}
	di, _ := os.Stat(disk)
	jd, _ := os.Stat(inv.HostPath(DiskName))
	if !os.SameFile(di, jd) {
		t.Error("the disk is not a link to the VM's disk")
	}
	// Not banger's: a dir beside it without a marker.
	foreign := filepath.Join(base, "firecracker", "other")
	if err := os.MkdirAll(filepath.Join(foreign, "root"), 0o700); err != nil {
		t.Fatal(err)
	}
	removed, refused := Stale(base, func(id string) bool { return false })
	if !slices.Equal(removed, []string{"vm-1"}) || len(refused) != 1 || !errors.Is(refused[0], ErrNotBangers) {
		t.Fatalf("Stale = %v, %v; want [vm-1] removed and the foreign dir refused", removed, refused)
	}
	if _, err := os.Stat(filepath.Join(foreign, "root")); err != nil {
		t.Errorf("Stale touched a dir that is not banger's: %v", err)
	}
	if _, err := os.Stat(inv.JailDir()); err == nil {
		t.Error("the stale jail is still there")
	}
	fi, err := os.Stat(disk)
	if err != nil || fi.Size() != 1 || fi.Sys().(*syscall.Stat_t).Uid != 0 || fi.Sys().(*syscall.Stat_t).Nlink != 1 {
		t.Errorf("the VM's disk after Stale: %v; want it intact, root's, with one link", err)
	}
}

func TestIDsFor(t *testing.T) {
	c := Config{UID: 900000, GID: 800000}
	if u, g, err := c.IDsFor(7); err != nil || u != 900000 || g != 800000 {
		t.Errorf("without id_range: %d %d %v; want the configured ids", u, g, err)
	}
	c.IDRange = 256
	if u, g, err := c.IDsFor(7); err != nil || u != 900007 || g != 800007 {
		t.Errorf("id_range 256, index 7: %d %d %v; want 900007 800007", u, g, err)
	}
	if _, _, err := c.IDsFor(256); !errors.Is(err, ErrContract) {
		t.Errorf("index 256 of id_range 256: %v, want refused", err)
	}
	if err := (Config{UID: 1<<32 - 10, GID: 1, IDRange: 100}).CheckRange(); !errors.Is(err, ErrContract) {
		t.Errorf("an overflowing range: %v, want refused", err)
	}
}
