package blockdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// recorder is a Runner and loop backend that keeps one ordered log of
// everything the Manager does, and simulates dmsetup's device table.
type recorder struct {
	t       *testing.T
	log     []string
	dm      map[string]string // name -> uuid
	loops   map[string]string // dev -> backing
	next    int
	onEvent func(string)
}

func newRecorder(t *testing.T) *recorder {
	return &recorder{t: t, dm: map[string]string{}, loops: map[string]string{}, next: 100}
}

func (r *recorder) add(s string) {
	r.log = append(r.log, s)
	if r.onEvent != nil {
		r.onEvent(s)
	}
}

func (r *recorder) Run(_ context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	line := name + " " + strings.Join(args, " ")
	if stdin != nil {
		line += " <<" + string(stdin)
	}
	if len(args) > 0 && args[0] == "info" {
		var b strings.Builder
		for n, u := range r.dm {
			fmt.Fprintf(&b, "%s|%s\n", n, u)
		}
		if len(r.dm) == 0 {
			b.WriteString("No devices found\n")
		}
		return []byte(b.String()), nil // not logged: lookups are not actions
	}
	r.add(line)
	if name == "dmsetup" && args[0] == "create" {
		r.dm[args[1]] = args[3]
	}
	if name == "dmsetup" && args[0] == "remove" {
		delete(r.dm, args[len(args)-1])
	}
	return nil, nil
}

func (r *recorder) Attach(_ context.Context, file string, ro bool) (string, error) {
	dev := fmt.Sprintf("/dev/loop%d", r.next)
	r.next++
	r.loops[dev] = file
	r.add(fmt.Sprintf("attach %s %s ro=%v", dev, filepath.Base(file), ro))
	return dev, nil
}

func (r *recorder) Find(file string) ([]string, error) {
	var out []string
	for d, f := range r.loops {
		if f == file {
			out = append(out, d)
		}
	}
	return out, nil
}

func (r *recorder) Detach(_ context.Context, dev, expect, _ string) error {
	if r.loops[dev] != expect {
		return ErrNotOurs
	}
	delete(r.loops, dev)
	r.add("detach " + dev + " " + filepath.Base(expect))
	return nil
}

func dmFixture(t *testing.T, imageBytes int64) (*Manager, *recorder, string, string) {
	state := t.TempDir()
	// A private lock file: the default under /run/banger is root's.
	prevLock := LockPath
	LockPath = filepath.Join(t.TempDir(), "blockdev.lock")
	t.Cleanup(func() { LockPath = prevLock })
	img := filepath.Join(state, "images", "img1", "rootfs.ext4")
	if err := os.MkdirAll(filepath.Dir(img), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, imageBytes); err != nil {
		t.Fatal(err)
	}
	rec := newRecorder(t)
	return &Manager{StateDir: state, Runner: rec, loops: rec}, rec, img, filepath.Join(state, "vms", "vm1")
}

func TestDMSnapshotTablesAndTeardownOrder(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name      string
		img, disk int64
		prepare   []string
	}{
		{"grown", 64 << 20, 128 << 20, []string{
			"intent files",
			"intent loop base.ext4.link",
			"attach /dev/loop100 base.ext4.link ro=true",
			"intent loop cow.img",
			"attach /dev/loop101 cow.img ro=false",
			"intent dm banger-vm1",
			"dmsetup create banger-vm1-base --uuid BANGER-vm1-base <<0 131072 linear /dev/loop100 0\n131072 131072 zero\n",
			"dmsetup mknodes banger-vm1-base",
			"dmsetup create banger-vm1 --uuid BANGER-vm1 --table 0 262144 snapshot /dev/mapper/banger-vm1-base /dev/loop101 P 8",
			"dmsetup mknodes banger-vm1",
			"resize2fs /dev/mapper/banger-vm1",
		}},
		{"same size", 64 << 20, 0, []string{
			"intent files",
			"intent loop base.ext4.link",
			"attach /dev/loop100 base.ext4.link ro=true",
			"intent loop cow.img",
			"attach /dev/loop101 cow.img ro=false",
			"intent dm banger-vm1",
			"dmsetup create banger-vm1 --uuid BANGER-vm1 --table 0 131072 snapshot /dev/loop100 /dev/loop101 P 8",
			"dmsetup mknodes banger-vm1",
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, rec, img, vmDir := dmFixture(t, tc.img)
			intent := func(d Disk) error {
				switch {
				case d.DMName != "":
					rec.add("intent dm " + d.DMName)
				case len(d.Loops) > 0:
					rec.add("intent loop " + filepath.Base(d.Loops[len(d.Loops)-1].BackingFile))
				default:
					rec.add("intent files")
				}
				return nil
			}
			d, err := m.Prepare(ctx, PrepareOptions{VMID: "vm1", BaseImage: img, VMDir: vmDir, SizeBytes: tc.disk, Driver: DriverDMSnapshot, Intent: intent})
			if err != nil {
				t.Fatalf("Prepare: %v", err)
			}
			if diff := cmp.Diff(tc.prepare, rec.log); diff != "" {
				t.Errorf("Prepare actions (-want +got):\n%s", diff)
			}
			if d.Path != "/dev/mapper/banger-vm1" || d.DMUUID != "BANGER-vm1" || len(d.Loops) != 2 {
				t.Errorf("Prepare = %+v", d)
			}
			for _, f := range []string{d.COWPath, d.BaseLink} {
				if _, err := os.Stat(f); err != nil {
					t.Errorf("Prepare left no %s: %v", f, err)
				}
			}

			// Teardown: dm devices, then loops (files still there), then files.
			rec.log = nil
			rec.onEvent = func(s string) {
				if strings.HasPrefix(s, "detach") || strings.HasPrefix(s, "dmsetup remove") {
					if _, err := os.Stat(d.COWPath); err != nil {
						t.Errorf("%q: COW file already gone: %v", s, err)
					}
				}
			}
			for i := range 2 {
				if err := m.Teardown(ctx, d); err != nil {
					t.Fatalf("Teardown #%d: %v", i+1, err)
				}
			}
			want := []string{"dmsetup remove --retry banger-vm1"}
			if tc.disk > tc.img {
				want = append(want, "dmsetup remove --retry banger-vm1-base")
			}
			want = append(want, "detach /dev/loop100 base.ext4.link", "detach /dev/loop101 cow.img")
			if diff := cmp.Diff(want, rec.log); diff != "" {
				t.Errorf("Teardown actions (-want +got):\n%s", diff)
			}
			for _, f := range []string{d.COWPath, d.BaseLink} {
				if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s survived Teardown: %v", f, err)
				}
			}
			if _, err := os.Stat(img); err != nil {
				t.Errorf("base image gone after Teardown: %v", err)
			}
		})
	}
}

func TestDMRefusesForeignDevices(t *testing.T) {
	ctx := context.Background()
	m, rec, _, vmDir := dmFixture(t, 64<<20)
	rec.dm["banger-vm1"] = "SOMEONE-ELSE"
	rec.dm["banger-vm1-base"] = ""
	d := Disk{Driver: DriverDMSnapshot, DMName: "banger-vm1", DMUUID: "BANGER-vm1", COWPath: filepath.Join(vmDir, COWFileName)}
	if err := m.Teardown(ctx, d); !errors.Is(err, ErrNotOurs) {
		t.Errorf("Teardown with a foreign uuid = %v, want ErrNotOurs", err)
	}
	// A record whose name and uuid disagree, or name a non-banger device.
	for _, bad := range []Disk{
		{DMName: "banger-vm1", DMUUID: "BANGER-vm2"},
		{DMName: "cryptroot", DMUUID: "CRYPT-LUKS2-x"},
		{DMName: "banger-vm1; rm -rf /", DMUUID: "BANGER-vm1; rm -rf /"},
	} {
		if err := m.Deactivate(ctx, bad); !errors.Is(err, ErrNotOurs) {
			t.Errorf("Deactivate(%+v) = %v, want ErrNotOurs", bad, err)
		}
	}
	for _, l := range rec.log {
		if strings.HasPrefix(l, "dmsetup remove") {
			t.Errorf("removed a foreign device: %s", l)
		}
	}
	if len(rec.dm) != 2 {
		t.Errorf("dm devices after refusals: %v", rec.dm)
	}
}

func TestPrepareRejectsBadInput(t *testing.T) {
	m, rec, img, vmDir := dmFixture(t, 64<<20)
	ctx := context.Background()
	for _, id := range []string{"", "../x", "a b", "vm1 --table", "-x", strings.Repeat("a", 65)} {
		if _, err := m.Prepare(ctx, PrepareOptions{VMID: id, BaseImage: img, VMDir: vmDir, Driver: DriverDMSnapshot}); !errors.Is(err, ErrInvalidVMID) {
			t.Errorf("Prepare(VMID %q) = %v, want ErrInvalidVMID", id, err)
		}
	}
	if _, err := m.Prepare(ctx, PrepareOptions{VMID: "vm1", BaseImage: img, VMDir: m.StateDir + "-evil/vm1", Driver: DriverCopy}); !errors.Is(err, ErrNotOurs) {
		t.Errorf("Prepare with a VM dir outside the state dir = %v, want ErrNotOurs", err)
	}
	if _, err := m.Prepare(ctx, PrepareOptions{VMID: "vm1", BaseImage: img, VMDir: vmDir, SizeBytes: 1 << 20, Driver: DriverCopy}); !errors.Is(err, ErrDiskTooSmall) {
		t.Errorf("Prepare smaller than the image = %v, want ErrDiskTooSmall", err)
	}
	if len(rec.log) != 0 {
		t.Errorf("rejected input still ran: %v", rec.log)
	}
}

func TestIsUnder(t *testing.T) {
	tests := []struct {
		path, dir string
		want      bool
	}{
		{"/var/lib/banger/vms/x/cow.img", "/var/lib/banger", true},
		{"/var/lib/banger-evil/cow.img", "/var/lib/banger", false},
		{"/var/lib/banger", "/var/lib/banger", false},
		{"/var/lib/banger/../etc/passwd", "/var/lib/banger", false},
		{"/var/lib", "/var/lib/banger", false},
		{"relative/x", "/var/lib/banger", false},
		{"/var/lib/banger/..data", "/var/lib/banger", true},
	}
	for _, tc := range tests {
		if got := isUnder(filepath.Clean(tc.path), tc.dir); got != tc.want {
			t.Errorf("isUnder(%q, %q) = %v, want %v", tc.path, tc.dir, got, tc.want)
		}
	}
}
