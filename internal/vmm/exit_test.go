package vmm

import (
	"os"
	"os/exec"
	"testing"
	"time"
)

// TestExitStatus: a started monitor's end is recorded once, as an exit
// status or the signal that killed it, and a process this daemon did not
// start has none.
func TestExitStatus(t *testing.T) {
	cases := []struct {
		script, want string
	}{
		{"exit 3", "exit status 3"},
		{"kill -9 $$", "killed by signal 9 (SIGKILL)"},
		{"kill -TERM $$", "killed by signal 15 (SIGTERM)"},
		{"true", "exit status 0"},
	}
	for _, c := range cases {
		out, err := os.CreateTemp(t.TempDir(), "out")
		if err != nil {
			t.Fatal(err)
		}
		// The sleep lets Identify read /proc before the process ends.
		p, err := StartDetachedOutput(exec.Command("sh", "-c", "sleep 0.2; "+c.script), out)
		_ = out.Close()
		if err != nil {
			t.Fatalf("%q: %v", c.script, err)
		}
		<-p.Done()
		got, ok := ExitStatus(p.Handle, time.Second)
		if !ok || got != c.want {
			t.Errorf("%q: ExitStatus = %q, %v; want %q", c.script, got, ok, c.want)
		}
		if again, ok := ExitStatus(p.Handle, 0); ok {
			t.Errorf("%q: read twice: %q", c.script, again)
		}
	}
	if got, ok := ExitStatus(Handle{PID: os.Getpid(), PIDStart: 1}, 0); ok {
		t.Errorf("a process never started here has a status: %q", got)
	}
}
