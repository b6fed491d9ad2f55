package kernels

import (
	"errors"
	"strings"
	"testing"
)

// TestDebugfsScriptLineGuard: a write line whose host path and name are
// each within the name limit but together longer than debugfs's line
// buffer is refused, not split into two commands.
func TestDebugfsScriptLineGuard(t *testing.T) {
	var s debugfsScript
	host := "/" + strings.Repeat(`"`, maxDebugfsName-1) // quotes double when encoded
	s.addBase("write", host, strings.Repeat(`"`, 2000))
	if !errors.Is(s.err, ErrUnsafeName) {
		t.Fatalf("addBase of a %d-byte line: err = %v, want ErrUnsafeName; script %d bytes", 2*maxDebugfsName+4000, s.err, s.buf.Len())
	}
	if s.buf.Len() != 0 {
		t.Errorf("the refused line was written (%d bytes)", s.buf.Len())
	}
	var ok debugfsScript
	ok.addBase("write", "/host/mod.ko", "mod.ko")
	ok.add("mkdir", "/lib/modules/x")
	if ok.err != nil || ok.n != 2 {
		t.Errorf("ordinary lines: n = %d, err = %v", ok.n, ok.err)
	}
}

// TestDebugfsStderrScannerError: a diagnostic line longer than the scanner
// holds fails the run; it used to end the scan silently and pass.
func TestDebugfsStderrScannerError(t *testing.T) {
	long := "debugfs 1.47.0 (5-Feb-2023)\n" + strings.Repeat("e", maxDebugfsStderr+10) + "\n"
	if _, err := stderrErrors(strings.NewReader(long)); err == nil {
		t.Error("stderrErrors of an over-long line returned no error")
	}
	bad, err := stderrErrors(strings.NewReader("debugfs 1.47.0 (5-Feb-2023)\nrm: File not found\n"))
	if err != nil || len(bad) != 1 || bad[0] != "rm: File not found" {
		t.Errorf("stderrErrors = %q, %v; want the one error line", bad, err)
	}
}
