// Package crash holds the crash-injection test: the daemon SIGKILLed in the
// middle of create, start, stop or delete, round after round, and nothing
// leaked after each restart.
package crash

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// crashOps are the operations crash injection interrupts, each with the
// daemon's failpoints on its way (internal/daemon/failpoint.go).
var crashOps = map[string][]string{
	"create": {"create:recorded", "create:disk", "create:unsynced"},
	"start":  {"start:starting", "start:tap-intent", "start:tap", "start:disk", "start:vmm", "start:recorded"},
	"stop":   {"stop:stopping", "stop:released"},
	"delete": {"delete:intent", "delete:released", "delete:dir"},
}

var crashOpNames = []string{"create", "start", "stop", "delete"}

// vmBrief is a line of banger vm ls -o json.
type vmBrief struct {
	Name  string        `json:"name"`
	State model.VMState `json:"state"`
}

// TestE2ECrashInjection kills the daemon with SIGKILL in the middle of
// create, start, stop or delete, round after round: half the rounds at a
// failpoint chosen at random (BANGER_FAILPOINT), half after a random delay.
// After each kill the daemon starts again, and the test checks, with the
// daemon stopped again so nothing moves: zero leaked taps, loops, dm
// devices, nftables tables, monitor processes, runtime, VM, staging and
// scratch dirs; every VM created, stopped or running with its live,
// verified monitor; the store consistent (store.Check).
//
// VMs run on banger-fake-firecracker, so a round takes seconds. Real QEMU
// rounds are in TestE2ERestartQEMU. BANGER_CRASH_ROUNDS (default 50) and
// BANGER_CRASH_SEED (default: the time) repeat a run.
func TestE2ECrashInjection(t *testing.T) {
	e := e2etest.FakeEnv(t, nil)
	d := e.D
	rounds := envInt(t, "BANGER_CRASH_ROUNDS", 50)
	seed := int64(envInt(t, "BANGER_CRASH_SEED", int(time.Now().UnixNano()%1e9)))
	t.Logf("crash injection: %d rounds, seed %d (BANGER_CRASH_SEED=%d repeats it)", rounds, seed, seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 0xbad)) //nolint:gosec // test randomness
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	var fired, timed, leakCount, ran int
	byOp := map[string]int{}
	next := 0
	var cycle [][2]string
	newName := func() string { next++; return fmt.Sprintf("c%d", next) }
	start := time.Now()
	for round := 1; round <= rounds; round++ {
		var vms []vmBrief
		d.JSON(ctx, &vms, "vm", "ls")
		// Odd rounds kill at a failpoint, taken in turn from a shuffled
		// cycle of all of them so each is hit; even rounds at a random time
		// during a random operation.
		op, fp := crashOpNames[rng.IntN(len(crashOpNames))], ""
		if round%2 == 1 {
			if len(cycle) == 0 {
				cycle = allFailpoints(rng)
			}
			op, fp = cycle[0][0], cycle[0][1]
			cycle = cycle[1:]
		}
		if op == "create" && len(vms) >= 5 && fp == "" {
			op = "delete"
		}
		if op == "delete" && len(vms) == 0 {
			name := newName()
			d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", name, "--memory", "256M", "--cpus", "1")
			vms = append(vms, vmBrief{Name: name, State: model.VMCreated})
		}
		// Bring a VM into the state the operation needs, with a daemon
		// that has no failpoint armed.
		var args []string
		switch op {
		case "create":
			args = []string{"vm", "create", "--image", e.Image, "--name", newName(), "--memory", "256M", "--cpus", "1"}
		case "start":
			name := pick(rng, vms, model.VMCreated, model.VMStopped)
			if name == "" {
				name = newName()
				d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", name, "--memory", "256M", "--cpus", "1")
			}
			args = []string{"vm", "start", name, "--wait"}
		case "stop":
			name := pick(rng, vms, model.VMRunning)
			if name == "" {
				if name = pick(rng, vms, model.VMCreated, model.VMStopped); name == "" {
					name = newName()
					d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", name, "--memory", "256M", "--cpus", "1")
				}
				d.MustCLI(ctx, "vm", "start", name, "--wait")
			}
			args = []string{"vm", "stop", name}
		case "delete":
			v := vms[rng.IntN(len(vms))]
			args = []string{"vm", "rm", v.Name}
			if v.State == model.VMRunning {
				args = []string{"vm", "rm", "--force", v.Name}
			}
		}
		byOp[op]++

		how := ""
		if fp != "" {
			how = "failpoint " + fp
			d.Stop()
			d.StartEnv(map[string]string{"BANGER_FAILPOINT": fp})
			logBefore := len(d.Log())
			r := d.CLI(ctx, args...)
			d.Kill()
			if strings.Contains(d.Log()[logBefore:], "failpoint "+fp+" reached") {
				fired++
			} else {
				how += " (not reached: " + fmt.Sprintf("exit %d %s", r.Code, strings.TrimSpace(r.Stderr)) + ")"
			}
		} else {
			delay := time.Duration(rng.IntN(400)) * time.Millisecond
			how = "SIGKILL after " + delay.String()
			done := make(chan e2etest.Result, 1)
			go func() { done <- d.CLI(ctx, args...) }()
			time.Sleep(delay)
			d.Kill()
			<-done
			timed++
		}
		ran++
		t.Logf("round %d: banger %s, killed at %s", round, strings.Join(args, " "), how)

		d.Start()
		e2etest.WaitSettled(ctx, t, d, 30*time.Second)
		e2etest.WithStore(t, d, func(st *store.Store, recs []model.VM) {
			l := e2etest.Leaks(t, e, recs)
			leases, err := st.Leases()
			if err != nil {
				t.Fatal(err)
			}
			if len(leases) != len(recs) {
				l = append(l, fmt.Sprintf("%d IP leases for %d VMs: %v", len(leases), len(recs), leases))
			}
			for _, s := range l {
				t.Errorf("round %d (%s, %s): %s", round, op, how, s)
			}
			leakCount += len(l)
		})
		if t.Failed() {
			t.Logf("daemon log tail:\n%s", e2etest.Tail(d.Log(), 60))
			break
		}
	}
	t.Logf("crash injection: %d rounds in %s (%d killed at a failpoint, %d at a random time; ops %v); leaks found: %d",
		ran, time.Since(start).Round(time.Second), fired, timed, byOp, leakCount)
	if want := ran / 2 * 9 / 10; fired < want {
		t.Errorf("only %d rounds reached their failpoint, want at least %d; the failpoints do not fire", fired, want)
	}

	// Everything still works after all that, and removing every VM leaves
	// nothing behind.
	var vms []vmBrief
	d.JSON(ctx, &vms, "vm", "ls")
	for _, v := range vms {
		d.MustCLI(ctx, "vm", "rm", "--force", v.Name)
	}
	e2etest.WithStore(t, d, func(_ *store.Store, recs []model.VM) {
		if len(recs) != 0 {
			t.Errorf("%d VM records left after removing all", len(recs))
		}
		for _, s := range e2etest.Leaks(t, e, recs) {
			t.Errorf("after removing every VM: %s", s)
		}
	})
}

// allFailpoints returns every (operation, failpoint) pair, shuffled.
func allFailpoints(rng *rand.Rand) [][2]string {
	var all [][2]string
	for _, op := range crashOpNames {
		for _, fp := range crashOps[op] {
			all = append(all, [2]string{op, fp})
		}
	}
	rng.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	return all
}

// pick returns the name of a random VM in one of the states, or "".
func pick(rng *rand.Rand, vms []vmBrief, states ...model.VMState) string {
	var names []string
	for _, v := range vms {
		for _, s := range states {
			if v.State == s {
				names = append(names, v.Name)
			}
		}
	}
	if len(names) == 0 {
		return ""
	}
	return names[rng.IntN(len(names))]
}

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, s, err)
	}
	return n
}
