package mounts

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// countMounts is how many mounts /proc/self/mountinfo has at dir.
func countMounts(dir string) int {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			n++
		}
	}
	return n
}

// A folder mounted at boot is in place before the host serves it: a
// program that reads it then waits (it does not see an empty directory),
// and gets the host's file once the host's stream arrives; that stream is
// served by the boot mount, not by a second mount over it.
func TestMountAtBootWaitsForTheHost(t *testing.T) {
	w := newWorld(t)
	requireFUSE(t)
	guestDir := filepath.Join(w.base, "guest/src")
	g := &Guest{CacheTimeout: 100 * time.Millisecond}
	if errs := g.MountAtBoot([]Spec{{GuestDir: guestDir}}, time.Minute); len(errs) > 0 {
		t.Fatalf("MountAtBoot: %v", errs)
	}
	t.Cleanup(func() { _ = syscall.Unmount(guestDir, syscall.MNT_DETACH) })
	if !mounted(guestDir) {
		t.Fatalf("%s is not a mount point after MountAtBoot", guestDir)
	}
	type result struct {
		b   []byte
		err error
	}
	read := make(chan result, 1)
	go func() {
		b, err := os.ReadFile(filepath.Join(guestDir, "hello.txt"))
		read <- result{b, err}
	}()
	select {
	case r := <-read:
		t.Fatalf("a read of the boot mount before the host served it returned %q, %v; want it to wait", r.b, r.err)
	case <-time.After(500 * time.Millisecond):
	}
	spec := Spec{HostDir: w.share, GuestDir: guestDir}
	conn, err := Dial(t.Context(), &pairStreamer{guest: g}, spec)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	p, err := w.launcher.Start(t.Context(), nobody, spec, conn, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	select {
	case r := <-read:
		if r.err != nil || string(r.b) != "hello from the host" {
			t.Fatalf("the waiting read returned %q, %v; want the host's hello.txt", r.b, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting read did not return 10 s after the host served the folder")
	}
	if n := countMounts(guestDir); n != 1 {
		t.Errorf("%d mounts at %s; want the boot mount only", n, guestDir)
	}
}

// A boot mount the host never serves stops the wait: after the timeout
// the waiting access fails with EIO and the folder is unmounted.
func TestMountAtBootTimeout(t *testing.T) {
	w := newWorld(t)
	requireFUSE(t)
	guestDir := filepath.Join(w.base, "guest/late")
	g := &Guest{}
	if errs := g.MountAtBoot([]Spec{{GuestDir: guestDir, ReadOnly: true}}, 700*time.Millisecond); len(errs) > 0 {
		t.Fatalf("MountAtBoot: %v", errs)
	}
	t.Cleanup(func() { _ = syscall.Unmount(guestDir, syscall.MNT_DETACH) })
	start := time.Now()
	_, err := os.Stat(filepath.Join(guestDir, "hello.txt"))
	if !errors.Is(err, syscall.EIO) {
		t.Errorf("stat in a boot mount never served: %v; want EIO", err)
	}
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("the stat returned after %s, before the timeout", d)
	}
	deadline := time.Now().Add(5 * time.Second)
	for mounted(guestDir) {
		if time.Now().After(deadline) {
			t.Fatal("the boot mount is still there 5 s after its timeout")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Refusals: the same rules as a stream's.
	if errs := g.MountAtBoot([]Spec{{GuestDir: "/"}, {GuestDir: "rel"}, {GuestDir: w.base + "/a/../b"}}, time.Second); len(errs) != 3 {
		t.Errorf("MountAtBoot of /, a relative and an unclean path: %v; want three errors", errs)
	}
}
