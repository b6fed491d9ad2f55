package daemon_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/testutil"
)

// clientAs returns an API client whose every connection to the daemon's
// socket is made by a thread whose effective uid and gid are uid and gid,
// so the daemon's SO_PEERCRED sees that real second user. It needs root
// and opens the socket to everyone (the test's own daemon).
func clientAs(t *testing.T, socket string, uid, gid int) *api.Client {
	t.Helper()
	testutil.RequiresRoot(t)
	if err := os.Chmod(socket, 0o666); err != nil { // #nosec G302 -- the test daemon's socket, reached by a second uid
		t.Fatal(err)
	}
	return api.NewClientDialer(socket, func(ctx context.Context) (net.Conn, error) { return dialAs(ctx, socket, uid, gid) })
}

// dialAs connects to socket from a locked OS thread that has switched only
// its own effective uid and gid (setresuid and setresgid on that thread,
// not the process: Go's syscall.Setuid would change every thread), then
// switches back. A thread that cannot switch back is never unlocked, so
// the runtime ends it with its goroutine.
func dialAs(ctx context.Context, socket string, uid, gid int) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	keep := ^uintptr(0) // -1: leave this id as it is
	go func() {
		runtime.LockOSThread()
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, keep, uintptr(gid), keep); e != 0 {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("setresgid %d: %w", gid, e)}
			return
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, keep, uintptr(uid), keep); e != 0 {
			_, _, _ = unix.RawSyscall(unix.SYS_SETRESGID, keep, 0, keep)
			done <- result{err: fmt.Errorf("setresuid %d: %w", uid, e)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", socket)
		_, _, e1 := unix.RawSyscall(unix.SYS_SETRESUID, keep, 0, keep)
		_, _, e2 := unix.RawSyscall(unix.SYS_SETRESGID, keep, 0, keep)
		if e1 == 0 && e2 == 0 {
			runtime.UnlockOSThread()
		}
		done <- result{c, err}
	}()
	r := <-done
	return r.c, r.err
}
