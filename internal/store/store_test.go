package store

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
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
