package store

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	bolt "go.etcd.io/bbolt"
)

// TestIDWinsOverName: a record named like another record's id neither gets
// created nor, when an older banger left one behind, hijacks lookups by
// that id.
func TestIDWinsOverName(t *testing.T) {
	s, _ := openTemp(t)
	const victimID = "0123456789abcdef01234567"
	victim := &model.VM{ID: victimID, Name: "victim", OwnerUID: 0, Created: time.Now()}
	if err := s.CreateVM(victim, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	hijack := &model.VM{ID: "fedcba9876543210fedcba98", Name: victimID, OwnerUID: 65534, Created: time.Now()}
	if err := s.CreateVM(hijack, netip.Prefix{}); !errors.Is(err, ErrConflict) {
		t.Fatalf("CreateVM of a VM named like another's id: %v, want ErrConflict", err)
	}
	// A VM whose new id is another's name is refused too.
	if err := s.CreateVM(&model.VM{ID: "victim", Name: "other", Created: time.Now()}, netip.Prefix{}); !errors.Is(err, ErrConflict) {
		t.Fatalf("CreateVM with an id that is another VM's name: %v, want ErrConflict", err)
	}

	// A legacy store: the hijacking name is already indexed.
	if err := s.db.Update(func(tx *bolt.Tx) error {
		hijack.Name = victimID
		if err := tx.Bucket(bVMNames).Put([]byte(victimID), []byte(hijack.ID)); err != nil {
			return err
		}
		return putVM(tx, hijack)
	}); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetVM(victimID)
	if err != nil || got.ID != victimID {
		t.Fatalf("GetVM(%s) = %s (%s), %v; want the victim, not the VM named like its id", victimID, got.ID, got.Name, err)
	}
	upd, err := s.UpdateVM(victimID, func(v *model.VM) error { v.Reason = "touched"; return nil })
	if err != nil || upd.ID != victimID {
		t.Fatalf("UpdateVM(%s) updated %s, %v", victimID, upd.ID, err)
	}
	if err := s.DeleteVM(victimID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetVM(hijack.ID); err != nil {
		t.Fatalf("DeleteVM(victim's id) removed the other user's VM: %v", err)
	}

	// Images: the same for a name equal to an existing id.
	img := model.Image{ID: "aaaaaaaaaaaaaaaaaaaaaaaa", Name: "debian"}
	if _, err := s.PutImage(img, false); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutImage(model.Image{ID: "bbbbbbbbbbbbbbbbbbbbbbbb", Name: img.ID}, true); !errors.Is(err, ErrConflict) {
		t.Fatalf("PutImage named like another image's id: %v, want ErrConflict", err)
	}
	if err := s.db.Update(func(tx *bolt.Tx) error {
		other := model.Image{ID: "bbbbbbbbbbbbbbbbbbbbbbbb", Name: img.ID}
		if err := tx.Bucket(bImageNames).Put([]byte(other.Name), []byte(other.ID)); err != nil {
			return err
		}
		return put(tx.Bucket(bImages), other.ID, other)
	}); err != nil {
		t.Fatal(err)
	}
	if got, err := s.GetImage(img.ID); err != nil || got.Name != "debian" {
		t.Fatalf("GetImage(%s) = %q, %v; want debian, not the image named like its id", img.ID, got.Name, err)
	}
}

func TestValidateNameRefusesIDs(t *testing.T) {
	if err := model.ValidateName("vm", "0123456789abcdef01234567"); err == nil {
		t.Fatal("a name of 24 hex digits was accepted")
	}
	if err := model.ValidateName("vm", "0123456789abcdef0123456"); err != nil {
		t.Fatalf("a 23-hex-digit name was refused: %v", err)
	}
}
