package sshkeys

import (
	"os"
	"syscall"
	"testing"
)

func statOwner(t *testing.T, p string) (uid, gid uint32) {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		t.Fatalf("no Stat_t for %s", p)
	}
	return st.Uid, st.Gid
}
