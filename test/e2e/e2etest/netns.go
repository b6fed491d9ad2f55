package e2etest

import (
	"fmt"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
)

// NetNS is a network namespace made for one test, named
// bgr-e2e-<run id>-<n> so that a later run can tell it is a leftover.
type NetNS struct {
	Name string
}

var netnsSeq atomic.Int64

// NewNetNS creates a network namespace with lo up; it is removed, and every
// process left in it killed, when the test ends.
func NewNetNS(t testing.TB) *NetNS {
	t.Helper()
	testutil.RequiresNetNS(t)
	if RunID() == "" {
		t.Fatal("e2etest.NewNetNS: the package's TestMain must call e2etest.Main")
	}
	ns := &NetNS{Name: fmt.Sprintf("%s%s-%d", netnsPrefix, RunID(), netnsSeq.Add(1))}
	if out, err := CombinedOutput(exec.Command("ip", "netns", "add", ns.Name)); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", ns.Name, err, out)
	}
	t.Cleanup(func() {
		for _, pid := range ns.PIDs() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(200 * time.Millisecond)
		if out, err := CombinedOutput(exec.Command("ip", "netns", "del", ns.Name)); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns.Name, err, out)
		}
	})
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	return ns
}

// Cmd returns a command that runs inside the namespace. Start it with
// e2etest.Start (or use Serve, MustRun) so it dies with the test binary.
func (ns *NetNS) Cmd(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// MustRun runs a command in the namespace and returns its combined output;
// a failure fails the test.
func (ns *NetNS) MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := CombinedOutput(ns.Cmd(name, args...))
	if err != nil {
		t.Fatalf("in netns %s: %s %v: %v\n%s", ns.Name, name, args, err, out)
	}
	return string(out)
}

// Serve starts a long-running helper (a server) in the namespace; it is
// killed when the test ends, or when the test binary dies.
func (ns *NetNS) Serve(t testing.TB, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := ns.Cmd(name, args...)
	if err := Start(cmd); err != nil {
		t.Fatalf("start %s in netns %s: %v", name, ns.Name, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

// PIDs lists the processes in the namespace.
func (ns *NetNS) PIDs() []int {
	out, _ := Output(exec.Command("ip", "netns", "pids", ns.Name))
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		var p int
		if _, err := fmt.Sscan(f, &p); err == nil {
			pids = append(pids, p)
		}
	}
	return pids
}
