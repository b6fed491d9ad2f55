package testutil

import (
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// InNetNS moves the calling test goroutine into a fresh network namespace
// for the rest of the test and removes the namespace when the test ends.
//
// The goroutine is locked to its OS thread, and only that thread enters the
// namespace: subtests (t.Run) and goroutines the test starts stay in the
// host namespace and must call InNetNS themselves. The thread is never
// unlocked, so when the test goroutine ends Go discards the thread instead
// of reusing it, even if switching back failed. It skips (see Missing)
// unless network namespaces are available. The host namespace's interfaces
// are never touched.
func InNetNS(t testing.TB) {
	t.Helper()
	RequiresNetNS(t)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatalf("get current network namespace: %v", err)
	}
	ns, err := netns.New() // creates the namespace and moves this thread into it
	if err != nil {
		_ = orig.Close()
		t.Fatalf("create network namespace: %v", err)
	}
	t.Cleanup(func() {
		if err := netns.Set(orig); err != nil {
			t.Errorf("return to the original network namespace: %v (this thread is discarded)", err)
		}
		_ = ns.Close() // the last reference: the kernel deletes the namespace
		_ = orig.Close()
	})
	// Loopback starts down in a new namespace; most tests want it up.
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("bring up lo in the test namespace: %v", err)
	}
}
