package mounts

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pairStreamer stands in for the agent session: each stream is a real
// socket pair whose far end the real guest side serves, on this host.
type pairStreamer struct{ guest *Guest }

func (p *pairStreamer) OpenService(ctx context.Context, service string) (net.Conn, error) {
	if service != ServiceName {
		return nil, fmt.Errorf("no service %q", service)
	}
	host, guest, err := socketPair()
	if err != nil {
		return nil, err
	}
	go func() { _ = p.guest.ServeStream(context.Background(), guest) }()
	return host, nil
}

// socketPair returns the two ends of a real Unix stream socket pair.
func socketPair() (net.Conn, net.Conn, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	conn := func(fd int) (net.Conn, error) {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		return net.FileConn(f)
	}
	a, err := conn(fds[0])
	if err != nil {
		return nil, nil, err
	}
	b, err := conn(fds[1])
	if err != nil {
		_ = a.Close()
		return nil, nil, err
	}
	return a, b, nil
}

func mounted(dir string) bool {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// The whole chain as the daemon and agent run it: Dial opens the stream,
// the guest mounts (creating the guest folder) and replies, the host hands
// the stream to a mount server running as the caller; stopping the server
// unmounts in the guest.
func TestStreamMountChain(t *testing.T) {
	w := newWorld(t)
	requireFUSE(t)
	guestDir := filepath.Join(w.base, "guest/src")
	spec := Spec{HostDir: w.share, GuestDir: guestDir}
	st := &pairStreamer{guest: &Guest{CacheTimeout: 100 * time.Millisecond}}
	conn, err := Dial(t.Context(), st, spec)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	if !mounted(guestDir) {
		t.Fatalf("%s is not a mount point after Dial returned", guestDir)
	}
	p, err := w.launcher.Start(t.Context(), nobody, spec, conn, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(guestDir, "hello.txt")); err != nil || string(b) != "hello from the host" {
		t.Fatalf("read through the chain: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(guestDir, "back.txt"), []byte("back"), 0o600); err != nil {
		t.Fatal(err)
	}
	if uid, _ := owner(t, filepath.Join(w.share, "back.txt")); uid != 65534 {
		t.Errorf("owner of a guest-made file = %d, want 65534", uid)
	}
	_ = p.Stop()
	deadline := time.Now().Add(5 * time.Second)
	for mounted(guestDir) {
		if time.Now().After(deadline) {
			_ = syscall.Unmount(guestDir, syscall.MNT_DETACH)
			t.Fatal("the guest mount is still there 5 s after its server stopped")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestStreamMountRefusals(t *testing.T) {
	w := newWorld(t)
	st := &pairStreamer{guest: &Guest{}}
	file := filepath.Join(w.base, "secret")
	for _, s := range []Spec{
		{HostDir: w.share, GuestDir: file},               // not a directory
		{HostDir: w.share, GuestDir: "relative"},         // not absolute
		{HostDir: w.share, GuestDir: "/"},                // the root
		{HostDir: w.share, GuestDir: w.base + "/a/../b"}, // not clean
		{HostDir: w.share, GuestDir: w.base + "/x\n"},    // control character
	} {
		c, err := Dial(t.Context(), st, s)
		if !errors.Is(err, ErrGuest) {
			if c != nil {
				_ = c.Close()
			}
			t.Errorf("Dial(%q): %v; want ErrGuest", s.GuestDir, err)
		}
	}
}

// TestStreamMountReads: Attach opens the folder's read stream next to its
// SFTP stream, and a file opened read-only in the guest reads through it
// (a large one whole, and the end of it).
func TestStreamMountReads(t *testing.T) {
	w := newWorld(t)
	requireFUSE(t)
	data := make([]byte, 9<<20+777)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.share, "big.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	guestDir := filepath.Join(w.base, "guest/src")
	spec := Spec{HostDir: w.share, GuestDir: guestDir}
	g := &Guest{CacheTimeout: 100 * time.Millisecond}
	set, err := Attach(t.Context(), &pairStreamer{guest: g}, w.launcher, nobody, []Spec{spec}, os.Stderr)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	defer set.Close()
	g.mu.Lock()
	m := g.served[guestDir]
	g.mu.Unlock()
	for deadline := time.Now().Add(5 * time.Second); m == nil || m.reads.Load() == nil; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the guest mount has no read stream 5 s after Attach")
		}
		g.mu.Lock()
		m = g.served[guestDir]
		g.mu.Unlock()
	}
	got, err := os.ReadFile(filepath.Join(guestDir, "big.bin"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through the read stream: %d bytes, %v; want %d bytes", len(got), err, len(data))
	}
	if b, err := os.ReadFile(filepath.Join(guestDir, "hello.txt")); err != nil || string(b) != "hello from the host" {
		t.Fatalf("small read: %q, %v", b, err)
	}
}
