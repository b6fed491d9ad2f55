package daemon

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
)

// FailpointEnv names the environment variable that arms failpoints: a
// comma-separated list of failpoint names. When the daemon reaches an armed
// failpoint it kills itself with SIGKILL, as a crash or `kill -9` at that
// line would. Crash-injection tests (test/e2e/crash_test.go) use it to stop
// the daemon between two steps of create, start, stop and delete and check
// that the next start-up leaves nothing behind. Unset (the normal case),
// failpoints do nothing.
//
// A name armed as "NAME=error" makes the step fail with an injected error
// instead, where the code asks for one with injected (tests of the
// failure paths in process use it).
//
// The failpoints, in the order each operation reaches them:
//
//	create:recorded      the VM record and IP lease are stored, no disk yet
//	create:disk          the disk is made, the record still says disk:creating
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
const FailpointEnv = "BANGER_FAILPOINT"

var failpoints = parseFailpoints(os.Getenv(FailpointEnv))

func parseFailpoints(s string) map[string]bool {
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

// failpoint kills the daemon with SIGKILL when name is armed in
// BANGER_FAILPOINT; otherwise it does nothing.
func failpoint(name string) {
	if !failpoints[name] {
		return
	}
	_, _ = os.Stderr.WriteString("banger: failpoint " + name + " reached: killing the daemon\n")
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // SIGKILL cannot be caught; wait for it to land
}

// ErrInjected is the error an armed "NAME=error" failpoint makes its step
// return.
var ErrInjected = errors.New("injected failure")

// injected returns ErrInjected when name is armed as "name=error".
func injected(name string) error {
	if failpoints[name+"=error"] {
		return fmt.Errorf("failpoint %s: %w", name, ErrInjected)
	}
	return nil
}
