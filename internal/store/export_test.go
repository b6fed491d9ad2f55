package store

import (
	"encoding/binary"

	bolt "go.etcd.io/bbolt"
)

type bbolt_Tx = bolt.Tx //nolint:revive

func setSchema(tx *bolt.Tx, v int) error {
	var raw [8]byte
	binary.BigEndian.PutUint64(raw[:], uint64(v))
	return tx.Bucket(bMeta).Put(kSchema, raw[:])
}
