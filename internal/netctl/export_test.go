package netctl

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// BoltLeases is the reference Leases implementation the tests run the
// conformance suite against: one bbolt bucket mapping VM id to address,
// allocation inside a write transaction.
type BoltLeases struct {
	db     *bolt.DB
	subnet netip.Prefix
}

var leaseBucket = []byte("leases")

// OpenBoltLeases opens (creating) dir/leases.db.
func OpenBoltLeases(dir string, subnet netip.Prefix) (*BoltLeases, error) {
	db, err := bolt.Open(filepath.Join(dir, "leases.db"), 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open lease db: %w", err)
	}
	return &BoltLeases{db: db, subnet: subnet}, nil
}

// Close closes the database.
func (l *BoltLeases) Close() error { return l.db.Close() }

// Allocate implements Leases.
func (l *BoltLeases) Allocate(vmID string) (netip.Addr, error) {
	var out netip.Addr
	err := l.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(leaseBucket)
		if err != nil {
			return err
		}
		if v := b.Get([]byte(vmID)); v != nil {
			out, err = netip.ParseAddr(string(v))
			return err
		}
		used := map[netip.Addr]bool{}
		if err := b.ForEach(func(_, v []byte) error {
			a, err := netip.ParseAddr(string(v))
			used[a] = true
			return err
		}); err != nil {
			return err
		}
		out, err = NextFreeIP(l.subnet, used)
		if err != nil {
			return err
		}
		return b.Put([]byte(vmID), []byte(out.String()))
	})
	if err != nil {
		return netip.Addr{}, fmt.Errorf("allocate address for VM %s: %w", vmID, err)
	}
	return out, nil
}

// Release implements Leases.
func (l *BoltLeases) Release(vmID string) error {
	return l.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(leaseBucket)
		if b == nil {
			return nil
		}
		return b.Delete([]byte(vmID))
	})
}
