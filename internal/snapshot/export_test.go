package snapshot

// Verified reports whether Verify would take path's current version as
// checked with sum, without hashing it.
func (s *Store) Verified(path, sum string) bool {
	st, ok := statStamp(path)
	return ok && s.verifiedAs(path, st, sum)
}
