package firecracker_test

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/consolelog"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
	"github.com/bangerdev/banger/internal/vmm/firecracker/fake"
)

// TestEndlessConsoleStaysCapped: a Firecracker guest writing to its serial
// console (Firecracker's stdout) without end. The console is a pipe the
// daemon follows into the capped log: at every sample the log and its
// rotated copy stay within the cap, the guest has written many times the
// cap, and the newest output is what is kept. Stop removes the pipe.
func TestEndlessConsoleStaysCapped(t *testing.T) {
	const max = 64 << 10
	m := fakeMonitor(t)().(*firecracker.Monitor)
	m.Args = []string{"--console-flood"}
	spec := fakeSpec(t)
	spec.ConsoleLogMax = max
	h, err := m.Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })
	if h.ConsoleFIFO == "" || h.ConsoleLog != spec.ConsoleLog || h.ConsoleLogMax != max {
		t.Fatalf("handle console = %q -> %q (max %d), want a pipe into %s (max %d)", h.ConsoleFIFO, h.ConsoleLog, h.ConsoleLogMax, spec.ConsoleLog, max)
	}
	size := func(p string) int64 {
		fi, err := os.Stat(p)
		if err != nil {
			return 0
		}
		return fi.Size()
	}
	deadline := time.Now().Add(3 * time.Second)
	samples := 0
	for time.Now().Before(deadline) {
		cur, old := size(spec.ConsoleLog), size(spec.ConsoleLog+".1")
		if cur > max || old > max+64<<10 {
			t.Fatalf("console log %d bytes, rotated copy %d bytes: over the %d-byte cap", cur, old, max)
		}
		samples++
		time.Sleep(2 * time.Millisecond)
	}
	if alive, err := m.Alive(h); !alive || err != nil {
		t.Fatalf("the flooding monitor is not alive: %v, %v", alive, err)
	}
	// The newest line's number says how much the guest wrote.
	// (the log may have just been truncated by a rotation: read both)
	old, _ := os.ReadFile(spec.ConsoleLog + ".1")
	b, err := os.ReadFile(spec.ConsoleLog)
	if err != nil {
		t.Fatal(err)
	}
	b = append(old, b...)
	last := lastFloodLine(b)
	if last < 0 {
		t.Fatalf("no flood line in the console log (%d bytes)", len(b))
	}
	lineLen := int64(len(fake.FloodLinePrefix) + 12 + 1 + 80 + 1)
	if written := int64(last) * lineLen; written < 10*max {
		t.Fatalf("the guest wrote about %d bytes in 3 s, want over 10x the %d-byte cap", written, max)
	}
	t.Logf("%d samples within the cap; the guest wrote about %d MiB", samples, int64(last)*lineLen>>20)
	if _, err := m.Stop(t.Context(), h, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(h.ConsoleFIFO); err == nil {
		t.Errorf("console pipe %s left after Stop", h.ConsoleFIFO)
	}
}

func lastFloodLine(b []byte) int {
	best := -1
	for _, line := range bytes.Split(b, []byte("\n")) {
		rest, ok := bytes.CutPrefix(line, []byte(fake.FloodLinePrefix))
		if !ok || len(rest) < 12 {
			continue
		}
		if n, err := strconv.Atoi(string(rest[:12])); err == nil && n > best {
			best = n
		}
	}
	return best
}

// TestConsoleSurvivesDaemonRestart: the console pipe's read end closes (the
// daemon exits) while the guest floods its console: Firecracker (the fake,
// which like Rust ignores SIGPIPE) keeps running and its output is
// dropped; a fresh monitor's Reattach (the next daemon) follows the pipe
// again, and the log grows again, within the cap.
func TestConsoleSurvivesDaemonRestart(t *testing.T) {
	const max = 64 << 10
	m := fakeMonitor(t)().(*firecracker.Monitor)
	m.Args = []string{"--console-flood"}
	spec := fakeSpec(t)
	spec.ConsoleLogMax = max
	h, err := m.Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = m.Stop(context.Background(), h, 0) })
	newest := func() int {
		old, _ := os.ReadFile(spec.ConsoleLog + ".1")
		cur, _ := os.ReadFile(spec.ConsoleLog)
		return lastFloodLine(append(old, cur...))
	}
	time.Sleep(200 * time.Millisecond)
	consolelog.Unfollow(h.ConsoleFIFO) // the daemon is gone
	before := newest()
	time.Sleep(500 * time.Millisecond)
	if alive, err := m.Alive(h); !alive || err != nil {
		t.Fatalf("the monitor died while nobody read its console: %v, %v", alive, err)
	}
	if got := newest(); got != before {
		t.Fatalf("the log grew (line %d to %d) while nobody followed the console", before, got)
	}
	m2 := fakeMonitor(t)()
	if err := m2.Reattach(t.Context(), h); err != nil {
		t.Fatalf("Reattach: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for newest() <= before+1000 {
		if time.Now().After(deadline) {
			t.Fatalf("after Reattach the console log did not grow (newest line %d, %d before)", newest(), before)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, p := range []string{spec.ConsoleLog, spec.ConsoleLog + ".1"} {
		if fi, err := os.Stat(p); err == nil && fi.Size() > max+64<<10 {
			t.Errorf("%s is %d bytes, over the cap %d", p, fi.Size(), max)
		}
	}
}
