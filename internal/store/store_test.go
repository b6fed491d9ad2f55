package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
)

func openTemp(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "banger.db")
	s, err := Open(path, time.Second)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

func TestSchemaVersionAndReopen(t *testing.T) {
	s, path := openTemp(t)
	v, err := s.SchemaVersion()
	if err != nil || v != CurrentSchema {
		t.Fatalf("SchemaVersion() = %d, %v; want %d", v, err, CurrentSchema)
	}
	if err := s.PutKernel(model.Kernel{Name: "k1", Version: "6.1"}, false); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s2, err := Open(path, time.Second)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s2.Close()
	k, err := s2.GetKernel("k1")
	if err != nil || k.Version != "6.1" {
		t.Fatalf("GetKernel after reopen = %+v, %v", k, err)
	}
}

func TestImageNamesAreUnique(t *testing.T) {
	s, _ := openTemp(t)
	if _, err := s.PutImage(model.Image{ID: "a", Name: "deb"}, false); err != nil {
		t.Fatal(err)
	}
	_, err := s.PutImage(model.Image{ID: "b", Name: "deb"}, false)
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("second PutImage with the same name: got %v, want ErrConflict", err)
	}
	old, err := s.PutImage(model.Image{ID: "b", Name: "deb"}, true)
	if err != nil || old == nil || old.ID != "a" {
		t.Fatalf("replace: old=%+v err=%v; want old id a", old, err)
	}
	img, err := s.GetImage("deb")
	if err != nil || img.ID != "b" {
		t.Fatalf("GetImage(deb) = %+v, %v", img, err)
	}
	if _, err := s.GetImage("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("old id still resolvable: %v", err)
	}
	if err := s.Check(); err != nil {
		t.Fatalf("Check: %v", err)
	}
}

func TestCreateVMAllocatesUniqueIPs(t *testing.T) {
	s, _ := openTemp(t)
	subnet := netip.MustParsePrefix("172.30.0.0/24")
	var wg sync.WaitGroup
	ips := make([]string, 100)
	errs := make([]error, 100)
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			vm := &model.VM{ID: fmt.Sprintf("id%03d", i), Name: fmt.Sprintf("vm%03d", i)}
			errs[i] = s.CreateVM(vm, subnet)
			ips[i] = vm.IP
		}()
	}
	wg.Wait()
	seen := map[string]bool{}
	for i, ip := range ips {
		if errs[i] != nil {
			t.Fatalf("CreateVM %d: %v", i, errs[i])
		}
		if ip == "172.30.0.0" || ip == "172.30.0.1" || ip == "172.30.0.255" {
			t.Fatalf("allocated reserved address %s", ip)
		}
		if seen[ip] {
			t.Fatalf("duplicate IP %s", ip)
		}
		seen[ip] = true
	}
	// Delete releases the lease; the freed address is reused.
	vm, _ := s.GetVM("vm042")
	if err := s.DeleteVM("vm042"); err != nil {
		t.Fatal(err)
	}
	nv := &model.VM{ID: "new", Name: "new"}
	if err := s.CreateVM(nv, subnet); err != nil {
		t.Fatal(err)
	}
	if nv.IP != vm.IP {
		t.Fatalf("new VM got %s, want the released %s", nv.IP, vm.IP)
	}
	if err := s.Check(); err != nil {
		t.Fatalf("Check: %v", err)
	}
}

func TestSubnetFull(t *testing.T) {
	s, _ := openTemp(t)
	subnet := netip.MustParsePrefix("10.9.0.0/30") // .2 is the only guest address
	if err := s.CreateVM(&model.VM{ID: "1", Name: "a"}, subnet); err != nil {
		t.Fatal(err)
	}
	err := s.CreateVM(&model.VM{ID: "2", Name: "b"}, subnet)
	if !errors.Is(err, ErrFull) {
		t.Fatalf("got %v, want ErrFull", err)
	}
	if _, err := s.GetVM("b"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a failed create left a record: %v", err)
	}
}

func TestUpdateVMAndOwnerFilter(t *testing.T) {
	s, _ := openTemp(t)
	for i, uid := range []uint32{0, 1000, 1000} {
		if err := s.CreateVM(&model.VM{ID: fmt.Sprint(i), Name: fmt.Sprint("v", i), OwnerUID: uid}, netip.Prefix{}); err != nil {
			t.Fatal(err)
		}
	}
	u := uint32(1000)
	mine, err := s.ListVMs(&u)
	if err != nil || len(mine) != 2 {
		t.Fatalf("ListVMs(1000) = %d VMs, %v; want 2", len(mine), err)
	}
	vm, err := s.UpdateVM("v1", func(vm *model.VM) error { vm.State = model.VMRunning; return nil })
	if err != nil || vm.State != model.VMRunning {
		t.Fatalf("UpdateVM = %+v, %v", vm, err)
	}
	if _, err := s.UpdateVM("v1", func(vm *model.VM) error { vm.Name = "x"; return nil }); err == nil {
		t.Fatal("UpdateVM allowed a rename")
	}
	if _, err := s.UpdateVM("nope", func(*model.VM) error { return nil }); !errors.Is(err, ErrNotFound) {
		t.Fatalf("UpdateVM(nope) = %v, want ErrNotFound", err)
	}
}

func TestNewerSchemaIsRefused(t *testing.T) {
	s, path := openTemp(t)
	if err := s.db.Update(func(tx *bbolt_Tx) error { return setSchema(tx, CurrentSchema+5) }); err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err := Open(path, time.Second)
	if err == nil {
		t.Fatal("Open accepted a store from a newer banger")
	}
}

// TestMigrationFromSchema1 builds a schema-1 store by hand and checks that
// opening it backfills the VM summaries of schema 2.
func TestMigrationFromSchema1(t *testing.T) {
	path := filepath.Join(t.TempDir(), "banger.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if err := migrations[0](tx); err != nil {
			return err
		}
		if err := setSchema(tx, 1); err != nil {
			return err
		}
		vm := model.VM{ID: "id1", Name: "old", State: model.VMStopped, OwnerUID: 7}
		if err := put(tx.Bucket(bVMs), vm.ID, vm); err != nil {
			return err
		}
		return tx.Bucket(bVMNames).Put([]byte("old"), []byte("id1"))
	})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	s, err := Open(path, time.Second)
	if err != nil {
		t.Fatalf("Open schema-1 store: %v", err)
	}
	defer s.Close()
	if v, _ := s.SchemaVersion(); v != CurrentSchema {
		t.Fatalf("schema %d after migration, want %d", v, CurrentSchema)
	}
	sums, err := s.VMSummaries(nil)
	if err != nil || len(sums) != 1 || !strings.Contains(string(sums[0]), `"name":"old"`) {
		t.Fatalf("summaries after migration = %s, %v", sums, err)
	}
	u := uint32(8)
	if other, _ := s.VMSummaries(&u); len(other) != 0 {
		t.Fatalf("owner filter: uid 8 sees %s", other)
	}
}

// schema2VM is a VM record as schema 2 stored it: the runtime flat.
const schema2VM = `{"id":"id2","name":"flat","owner_uid":0,"image":"img","image_id":"img-1","kernel":"k","cpus":1,"memory_mib":128,
"disk_bytes":1,"vmm":"qemu","disk_driver":"dm-snapshot","state":"running","created":"2026-12-01T00:00:00Z",
"runtime":{"phase":"running","pid":4242,"pid_start":99,"boot_id":"b","cmdline":["qemu-system-x86_64","-qmp","unix:/run/banger/vms/id2/qmp.sock"],
"runtime_dir":"/run/banger/vms/id2","api_socket":"/run/banger/vms/id2/qmp.sock","agent_socket":"/run/banger/vms/id2/agent.sock",
"console_log":"/var/lib/banger/vms/id2/console.log","tap":"bgr-0123456789a","tap_alias":"banger:id2",
"loops":[{"device":"/dev/loop3","backing_file":"/var/lib/banger/vms/id2/base.ext4.link","read_only":true},{"device":"/dev/loop4","backing_file":"/var/lib/banger/vms/id2/cow.img"}],
"dm_name":"banger-id2","dm_uuid":"BANGER-id2","cow_path":"/var/lib/banger/vms/id2/cow.img","base_link":"/var/lib/banger/vms/id2/base.ext4.link",
"disk_path":"/dev/mapper/banger-id2","vsock_cid":1003,"agent_transport":"virtio-serial"}}`

// wantSchema2Runtime is schema2VM's runtime in the composed shape.
var wantSchema2Runtime = model.Runtime{Phase: "running", RuntimeDir: "/run/banger/vms/id2", ConsoleLog: "/var/lib/banger/vms/id2/console.log",
	Monitor: vmm.Handle{PID: 4242, PIDStart: 99, BootID: "b", Cmdline: []string{"qemu-system-x86_64", "-qmp", "unix:/run/banger/vms/id2/qmp.sock"},
		APISocket: "/run/banger/vms/id2/qmp.sock", AgentSocket: "/run/banger/vms/id2/agent.sock", AgentTransport: "virtio-serial", AgentCID: 1003},
	Disk: blockdev.Disk{Driver: "dm-snapshot", Path: "/dev/mapper/banger-id2", COWPath: "/var/lib/banger/vms/id2/cow.img",
		BaseLink: "/var/lib/banger/vms/id2/base.ext4.link", DMName: "banger-id2", DMUUID: "BANGER-id2",
		Loops: []model.LoopDev{{Device: "/dev/loop3", BackingFile: "/var/lib/banger/vms/id2/base.ext4.link", ReadOnly: true},
			{Device: "/dev/loop4", BackingFile: "/var/lib/banger/vms/id2/cow.img"}}},
	Tap: netctl.TapRef{Name: "bgr-0123456789a", Alias: "banger:id2"}}

// TestMigrationFromSchema2 opens a store written by schema 2, whose VM
// runtimes are flat: the record reads back with every field in its part,
// the disk's driver taken from the VM.
func TestMigrationFromSchema2(t *testing.T) {
	path := filepath.Join(t.TempDir(), "banger.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, m := range migrations[:2] {
			if err := m(tx); err != nil {
				return err
			}
		}
		if err := setSchema(tx, 2); err != nil {
			return err
		}
		if err := tx.Bucket(bVMs).Put([]byte("id2"), []byte(schema2VM)); err != nil {
			return err
		}
		return tx.Bucket(bVMNames).Put([]byte("flat"), []byte("id2"))
	})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	s, err := Open(path, time.Second)
	if err != nil {
		t.Fatalf("Open schema-2 store: %v", err)
	}
	defer s.Close()
	if v, _ := s.SchemaVersion(); v != CurrentSchema || v < 3 {
		t.Fatalf("schema %d after migration, want %d", v, CurrentSchema)
	}
	vm, err := s.GetVM("flat")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(wantSchema2Runtime, vm.Runtime); diff != "" {
		t.Errorf("migrated runtime (-want +got):\n%s", diff)
	}
	if vm.Name != "flat" || vm.State != model.VMRunning || vm.DiskDriver != "dm-snapshot" {
		t.Errorf("migrated VM lost fields: %+v", vm)
	}
}

// TestDecodeRuntimeBothShapes: a handles.json written by an earlier daemon
// holds the flat runtime; DecodeRuntime reads it and the composed shape
// alike, and refuses what is not JSON.
func TestDecodeRuntimeBothShapes(t *testing.T) {
	var rec struct {
		Runtime json.RawMessage `json:"runtime"`
	}
	if err := json.Unmarshal([]byte(schema2VM), &rec); err != nil {
		t.Fatal(err)
	}
	want := wantSchema2Runtime
	want.Disk.Driver = "" // the flat runtime did not hold it
	got, err := DecodeRuntime(rec.Runtime)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("DecodeRuntime(flat) (-want +got):\n%s", diff)
	}
	raw, err := json.Marshal(wantSchema2Runtime)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := DecodeRuntime(raw); err != nil || !got.SameIdentity(wantSchema2Runtime) {
		t.Errorf("DecodeRuntime(composed) = %+v, %v", got, err)
	}
	if got, err := DecodeRuntime(nil); err != nil || !got.Empty() {
		t.Errorf("DecodeRuntime(nil) = %+v, %v, want an empty runtime", got, err)
	}
	if _, err := DecodeRuntime([]byte(`{"pid":`)); err == nil {
		t.Error("DecodeRuntime of truncated JSON succeeded")
	}
}
