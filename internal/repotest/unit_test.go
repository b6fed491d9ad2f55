package repotest

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"
)

// TestSystemdUnitHardening: packaging/banger.service keeps the sandbox the
// daemon is meant to run in (issue 15): a private /tmp, a read-only system
// with only banger's own dirs writable, read-only homes, no privilege gain,
// no personality change. When systemd-analyze is installed, it must accept
// the unit's security settings too.
func TestSystemdUnitHardening(t *testing.T) {
	unit := filepath.Join("..", "..", "packaging", "banger.service")
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "[") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: line %q is not key=value", unit, line)
		}
		got[k] = append(got[k], strings.Fields(v)...)
	}
	for k, want := range map[string]string{
		"PrivateTmp":      "yes",
		"ProtectSystem":   "strict",
		"ProtectHome":     "read-only",
		"NoNewPrivileges": "yes",
		"LockPersonality": "yes",
	} {
		if !slices.Equal(got[k], []string{want}) {
			t.Errorf("%s: %s=%v, want %s", unit, k, got[k], want)
		}
	}
	// ProtectSystem=strict makes everything read-only: the daemon's own
	// dirs (root defaults of internal/config) must be given back.
	for _, dir := range []string{"/var/lib/banger", "/var/cache/banger", "/run/banger"} {
		if !slices.Contains(got["ReadWritePaths"], dir) {
			t.Errorf("%s: ReadWritePaths=%v lacks %s", unit, got["ReadWritePaths"], dir)
		}
	}
	testutil.RequiresTool(t, "systemd-analyze") // the directives were checked by name above; this checks their effect
	out, err := exec.Command("systemd-analyze", "security", "--offline=yes", unit).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security --offline=yes %s: %v\n%s", unit, err, out)
	}
	for _, want := range []string{"✓ PrivateTmp=", "✓ ProtectSystem=", "✓ LockPersonality="} {
		if !strings.Contains(string(out), want) {
			t.Errorf("systemd-analyze security does not report %q:\n%s", want, out)
		}
	}
}
