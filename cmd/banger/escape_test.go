package main

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/model"
)

// TestGuestStringsNeutralized: a guest controls its console, its first-boot
// log and the reasons its agent reports. Printed raw, their escape
// sequences act on the user's terminal (retitle it, clear it, write the
// clipboard). The CLI shows them as visible escapes instead: in vm inspect
// (and every table), vm logs (unless --raw) and error lines.
func TestGuestStringsNeutralized(t *testing.T) {
	const evil = "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07"
	s := daemontest.Start(t, nil)
	vm := &model.VM{
		ID: "0123456789abcdef01234567", Name: "victim", State: model.VMError, Created: time.Now(),
		Reason: "first boot failed: " + evil, FirstBoot: "failed",
	}
	if err := s.D.Store().CreateVM(vm, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	logDir := filepath.Join(s.Config.StateDir, "vms", vm.ID)
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(logDir, "console.log"), []byte("boot\r\n"+evil+"done\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"vm", "inspect", "victim"}, {"vm", "logs", "victim"}} {
		out, errOut, code := runCLI(t, s.Config.Socket, args...)
		if code != 0 {
			t.Fatalf("banger %s: exit %d: %s", strings.Join(args, " "), code, errOut)
		}
		if strings.ContainsAny(out, "\x1b\x07") {
			t.Errorf("banger %s printed raw terminal escapes: %q", strings.Join(args, " "), out)
		}
		if !strings.Contains(out, `\x1b]0;pwned\x07`) {
			t.Errorf("banger %s does not show the escapes visibly: %q", strings.Join(args, " "), out)
		}
	}
	if out, _, _ := runCLI(t, s.Config.Socket, "vm", "logs", "--raw", "victim"); !strings.Contains(out, evil) {
		t.Errorf("vm logs --raw altered the console's bytes: %q", out)
	}
	if line := errorLine(errors.New("VM \"victim\" is in error: " + evil)); strings.ContainsAny(line, "\x1b\x07") {
		t.Errorf("error line printed raw terminal escapes: %q", line)
	}
}
