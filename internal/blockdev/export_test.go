package blockdev

// SetSyncWrites turns fsync of prepared disks on or off (benchmarks only)
// and returns the previous setting.
func SetSyncWrites(on bool) bool {
	prev := syncWrites
	syncWrites = on
	return prev
}
