package testutil

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

func TestRequired(t *testing.T) {
	tests := []struct {
		ci, tiers string // "-" = unset
		tier      Tier
		want      bool
	}{
		{"-", "-", TierRoot, false},
		{"true", "-", TierRoot, true},
		{"true", "-", TierVM, true},
		{"true", "-", TierSlow, true},
		{"true", "-", TierDM, false},
		{"true", "-", TierKVM, false},
		{"true", "-", TierOptIn, false},
		{"true", "-", TierVsock, false},
		{"false", "-", TierRoot, false},
		{"true", "vm, netns", TierNetNS, true},
		{"true", "vm,netns", TierRoot, false},
		{"-", "dm", TierDM, true},
		{"true", "", TierRoot, false},
	}
	for _, tt := range tests {
		setOrUnset(t, "CI", tt.ci)
		setOrUnset(t, "BANGER_REQUIRE_TIERS", tt.tiers)
		if got := Required(tt.tier); got != tt.want {
			t.Errorf("CI=%s BANGER_REQUIRE_TIERS=%s: Required(%s) = %v, want %v", tt.ci, tt.tiers, tt.tier, got, tt.want)
		}
	}
}

func setOrUnset(t *testing.T, k, v string) {
	t.Helper()
	t.Setenv(k, v) // restores the old value when the test ends
	if v == "-" {
		_ = os.Unsetenv(k)
	}
}

// TestGateChild is the test the gate tests run in a child process: it calls
// the gate named by BANGER_TESTUTIL_GATE, so the parent can see whether the
// test skipped or failed. Run on its own, it does nothing.
func TestGateChild(t *testing.T) {
	switch os.Getenv("BANGER_TESTUTIL_GATE") {
	case "missing-root":
		Missing(t, TierRoot, "the gate's reason")
	case "short":
		SkipIfShort(t, "the gate's reason")
	case "optin":
		OptIn(t, "BANGER_TESTUTIL_OPTIN", "the gate's reason")
	case "tool":
		RequiresTool(t, "banger-no-such-tool")
	case "":
		return
	}
	t.Log("gate passed")
}

// TestGatesSkipOrFail runs each gate in a child test binary and checks the
// outcome: a skip with the reason where the tier is optional, a failure
// naming the tier and reason where it is required (CI=true), and a pass
// where the feature is there.
func TestGatesSkipOrFail(t *testing.T) {
	tests := []struct {
		gate string
		env  []string
		args []string
		want string // "skip", "fail" or "pass"
		text string // in the output
	}{
		{"missing-root", nil, nil, "skip", "skipping root-tier test: the gate's reason"},
		{"missing-root", []string{"CI=true"}, nil, "fail", `required test tier "root" cannot run: the gate's reason`},
		{"missing-root", []string{"CI=true", "BANGER_REQUIRE_TIERS=vm"}, nil, "skip", "the gate's reason"},
		{"short", nil, []string{"-test.short"}, "skip", "-short: the gate's reason"},
		{"short", []string{"CI=true"}, []string{"-test.short"}, "fail", `required test tier "slow"`},
		{"short", []string{"CI=true"}, nil, "pass", "gate passed"},
		{"optin", []string{"CI=true"}, nil, "skip", "set BANGER_TESTUTIL_OPTIN=1 to run it"},
		{"optin", []string{"CI=true", "BANGER_TESTUTIL_OPTIN=1"}, nil, "pass", "gate passed"},
		{"optin", []string{"BANGER_REQUIRE_TIERS=opt-in"}, nil, "fail", `required test tier "opt-in"`},
		{"tool", nil, nil, "skip", "banger-no-such-tool not found in PATH"},
		{"tool", []string{"CI=true"}, nil, "fail", `required test tier "tools" cannot run: banger-no-such-tool not found`},
	}
	for _, tt := range tests {
		cmd := exec.Command(os.Args[0], append([]string{"-test.run=^TestGateChild$", "-test.v", "-test.count=1"}, tt.args...)...)
		cmd.Env = append(cleanEnv(), "BANGER_TESTUTIL_GATE="+tt.gate)
		cmd.Env = append(cmd.Env, tt.env...)
		out, err := cmd.CombinedOutput()
		got := "pass"
		switch {
		case err != nil:
			got = "fail"
		case strings.Contains(string(out), "--- SKIP: TestGateChild"):
			got = "skip"
		}
		if got != tt.want || !strings.Contains(string(out), tt.text) {
			t.Errorf("gate %s with %v %v: %s, want %s with %q in the output:\n%s", tt.gate, tt.env, tt.args, got, tt.want, tt.text, out)
		}
	}
}

// cleanEnv is the environment without the variables that choose tiers.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CI=") && !strings.HasPrefix(kv, "BANGER_REQUIRE_TIERS=") && !strings.HasPrefix(kv, "BANGER_TESTUTIL_") {
			env = append(env, kv)
		}
	}
	return env
}
