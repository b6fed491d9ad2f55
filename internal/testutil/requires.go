// Package testutil holds the gates that decide which test tiers can run on
// this host, and the helpers those tiers share.
//
// A gate either returns (the feature is here) or skips the test with the
// reason. Under CI=true a gate whose tier is required fails the test instead
// of skipping it, so a CI run that silently lost a tier goes red. The
// required tiers come from BANGER_REQUIRE_TIERS (comma separated); under
// CI=true it defaults to DefaultCITiers.
package testutil

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/kvm"
)

// Tier names a group of tests that need the same host feature.
type Tier string

// The tiers banger's tests are split into.
const (
	TierRoot     Tier = "root"     // euid 0
	TierNetNS    Tier = "netns"    // network namespaces, bridges, taps, nftables
	TierLoop     Tier = "loop"     // loop devices
	TierDM       Tier = "dm"       // device-mapper (/dev/mapper/control)
	TierQEMU     Tier = "qemu"     // qemu-system-x86_64 can boot a guest (TCG is enough)
	TierKVM      Tier = "kvm"      // hardware virtualization
	TierVM       Tier = "vm"       // end-to-end VM boots (slow; needs qemu + root + test images)
	TierTools    Tier = "tools"    // external tools a test compares against (skopeo, umoci, docker-registry, mmdebstrap)
	TierSlow     Tier = "slow"     // tests that -short leaves out (large fixtures, many files)
	TierHost     Tier = "host"     // a property of the host a test checks, such as the temp dir's file system
	TierVsock    Tier = "vsock"    // AF_VSOCK with a loopback transport (vsock_loopback)
	TierOptIn    Tier = "opt-in"   // runs only when asked for: benchmarks, corpus regeneration
	TierOptional Tier = "optional" // a conformance case for an optional capability the implementation under test lacks
)

// DefaultCITiers are the tiers that must run under CI=true on the machines
// banger's CI uses (see shared/MACHINE.md): no device-mapper, no hardware KVM.
var DefaultCITiers = []Tier{TierRoot, TierNetNS, TierLoop, TierQEMU, TierVM, TierTools, TierSlow, TierHost}

// Required reports whether tier must not be skipped in this run.
func Required(tier Tier) bool {
	spec, ok := os.LookupEnv("BANGER_REQUIRE_TIERS")
	if !ok {
		if os.Getenv("CI") != "true" {
			return false
		}
		for _, t := range DefaultCITiers {
			if t == tier {
				return true
			}
		}
		return false
	}
	for _, f := range strings.Split(spec, ",") {
		if Tier(strings.TrimSpace(f)) == tier {
			return true
		}
	}
	return false
}

// Missing stops the test because tier's feature is absent: a skip with the
// reason, or a failure when the tier is required in this run.
func Missing(t testing.TB, tier Tier, reason string) {
	t.Helper()
	if Required(tier) {
		t.Fatalf("required test tier %q cannot run: %s (CI=%q, BANGER_REQUIRE_TIERS=%q)",
			tier, reason, os.Getenv("CI"), os.Getenv("BANGER_REQUIRE_TIERS"))
	}
	t.Skipf("skipping %s-tier test: %s", tier, reason)
}

// RequiresRoot skips (or fails, see Missing) unless the test runs as root.
func RequiresRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, TierRoot, "needs root (euid is "+fmt.Sprint(os.Geteuid())+")")
	}
}

// RequiresNetNS skips unless the test can create network namespaces.
func RequiresNetNS(t testing.TB) {
	t.Helper()
	RequiresRoot(t)
	if _, err := exec.LookPath("ip"); err != nil {
		Missing(t, TierNetNS, "iproute2 'ip' not found in PATH")
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		Missing(t, TierNetNS, "kernel has no network namespaces: "+err.Error())
	}
}

// RequiresLoop skips unless loop devices can be attached.
func RequiresLoop(t testing.TB) {
	t.Helper()
	RequiresRoot(t)
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		Missing(t, TierLoop, "/dev/loop-control is absent: "+err.Error())
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		Missing(t, TierLoop, "losetup not found in PATH")
	}
}

// RequiresDM skips unless device-mapper is usable.
func RequiresDM(t testing.TB) {
	t.Helper()
	RequiresRoot(t)
	if _, err := os.Stat("/dev/mapper/control"); err != nil {
		Missing(t, TierDM, "device-mapper is not available: /dev/mapper/control is absent")
	}
	if _, err := exec.LookPath("dmsetup"); err != nil {
		Missing(t, TierDM, "dmsetup not found in PATH")
	}
}

// RequiresQEMU skips unless qemu-system-x86_64 is installed.
func RequiresQEMU(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		Missing(t, TierQEMU, "qemu-system-x86_64 not found in PATH (apt-get install qemu-system-x86)")
	}
}

// RequiresKVM skips unless hardware virtualization is usable.
func RequiresKVM(t testing.TB) {
	t.Helper()
	if ok, why := kvm.Hardware(); !ok {
		Missing(t, TierKVM, why)
	}
}

// RequiresVM skips unless end-to-end VM tests can run: root, QEMU, and
// BANGER_E2E not set to 0. Slow tests call this instead of RequiresQEMU.
func RequiresVM(t testing.TB) {
	t.Helper()
	if os.Getenv("BANGER_E2E") == "0" {
		Missing(t, TierVM, "BANGER_E2E=0 disables VM boots")
	}
	if testing.Short() {
		Missing(t, TierVM, "-short disables VM boots")
	}
	RequiresRoot(t)
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		Missing(t, TierVM, "qemu-system-x86_64 not found in PATH (apt-get install qemu-system-x86)")
	}
}

// RequiresTool skips unless every named program is in PATH.
func RequiresTool(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			Missing(t, TierTools, n+" not found in PATH")
		}
	}
}

// SkipIfShort skips (or fails, see Missing) a slow test under -short,
// saying what makes it slow.
func SkipIfShort(t testing.TB, why string) {
	t.Helper()
	if testing.Short() {
		Missing(t, TierSlow, "-short: "+why)
	}
}

// OptIn skips the test unless the environment variable env is "1": for
// benchmarks and tools that run only when asked (make bench). The opt-in
// tier is never required by default, so it skips with the reason under CI
// too, unless BANGER_REQUIRE_TIERS names it.
func OptIn(t testing.TB, env, what string) {
	t.Helper()
	if os.Getenv(env) != "1" {
		Missing(t, TierOptIn, what+": set "+env+"=1 to run it")
	}
}

// Unsupported skips a conformance case that does not apply: the
// implementation under test lacks an optional capability (it returns
// ErrNotSupported or does not implement the role interface). The optional
// tier is never required by default; BANGER_REQUIRE_TIERS=optional makes
// every such skip a failure.
func Unsupported(t testing.TB, reason string) {
	t.Helper()
	Missing(t, TierOptional, reason)
}

// RequiresVsock skips unless AF_VSOCK exists on this host.
func RequiresVsock(t testing.TB) {
	t.Helper()
	if _, err := os.Stat("/dev/vsock"); err != nil {
		Missing(t, TierVsock, "no AF_VSOCK on this kernel: "+err.Error())
	}
}

// ErrSkip is returned by helpers that build slow fixtures when the fixture's
// inputs are unavailable; callers pass it to Missing.
var ErrSkip = errors.New("fixture unavailable")
