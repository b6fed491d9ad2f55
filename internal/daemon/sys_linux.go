package daemon

import (
	"os"
	"syscall"
)

// allocated returns the bytes the file occupies on disk (sparse files count
// only their data).
func allocated(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
