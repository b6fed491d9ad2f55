package blockdev

// SetSyncWrites turns fsync of prepared disks on or off (benchmarks only)
// and returns the previous setting.
func SetSyncWrites(on bool) bool {
	prev := syncWrites
	syncWrites = on
	return prev
}

// SetBeforePromote sets the hook run between a background flush's fsync and
// its rename (nil: none).
func SetBeforePromote(fn func(disk string)) { beforePromote = fn }
