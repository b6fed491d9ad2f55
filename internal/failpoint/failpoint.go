// Package failpoint lets crash-injection tests stop the daemon, or fail one
// step, at a named line of create, start, stop and delete.
//
// Env names the environment variable that arms failpoints: a
// comma-separated list of names. When the daemon reaches an armed failpoint
// (Reach) it kills itself with SIGKILL, as a crash or `kill -9` at that line
// would. Crash-injection tests (test/e2e/crash_test.go) use it to stop the
// daemon between two steps and check that the next start-up leaves nothing
// behind. A name armed as "NAME=error" makes the step fail with an injected
// error instead, where the code asks with Injected (tests of the failure
// paths in process use it). Unset (the normal case), failpoints do nothing.
//
// The failpoints, in the order each operation reaches them:
//
//	create:recorded      the VM record and IP lease are stored, no disk yet
//	create:disk          the disk is made, the record still says disk:creating
//	create:unsynced      the record is final (created), the disk copy is still
//	                     disk.ext4.unsynced: its background flush has not begun
//	start:starting       the VM is marked starting, nothing made yet
//	start:disk           the disk is active, no tap
//	start:tap-intent     the tap is recorded, not created
//	start:tap            the tap exists, no monitor
//	start:vmm            the monitor runs, its pid is not recorded
//	start:confirm        (=error only) recording the monitor's pid fails
//	start:recorded       the monitor's pid is recorded, no boot waiter
//	stop:stopping        the VM is marked stopping, nothing released
//	stop:released        everything is released, the record still holds it
//	delete:intent        the delete is recorded, nothing removed
//	delete:released      devices and runtime dir are gone, disk and record remain
//	delete:dir           the VM dir is gone, the record remains
package failpoint

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
)

// Env is the environment variable that arms failpoints.
const Env = "BANGER_FAILPOINT"

var (
	mu    sync.RWMutex
	armed = Parse(os.Getenv(Env))
)

// Parse reads a comma-separated list of failpoint names.
func Parse(s string) map[string]bool {
	if s == "" {
		return nil
	}
	m := map[string]bool{}
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			m[f] = true
		}
	}
	return m
}

// Arm replaces the armed failpoints with names (as Env would list them)
// and returns a function that restores the previous set. For tests.
func Arm(names ...string) (restore func()) {
	mu.Lock()
	defer mu.Unlock()
	prev := armed
	armed = Parse(strings.Join(names, ","))
	return func() {
		mu.Lock()
		defer mu.Unlock()
		armed = prev
	}
}

func isArmed(name string) bool {
	mu.RLock()
	defer mu.RUnlock()
	return armed[name]
}

// Reach kills the daemon with SIGKILL when name is armed; otherwise it does
// nothing.
func Reach(name string) {
	if !isArmed(name) {
		return
	}
	_, _ = os.Stderr.WriteString("banger: failpoint " + name + " reached: killing the daemon\n")
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // SIGKILL cannot be caught; wait for it to land
}

// ErrInjected is the error an armed "NAME=error" failpoint makes its step
// return.
var ErrInjected = errors.New("injected failure")

// Injected returns ErrInjected when name is armed as "name=error".
func Injected(name string) error {
	if isArmed(name + "=error") {
		return fmt.Errorf("failpoint %s: %w", name, ErrInjected)
	}
	return nil
}
