package blockdev_test

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
)

// flushFixture is a state dir with an 8 MiB image of random bytes (the copy
// driver copies any file; no resize is asked, so no ext4 is needed).
type flushFixture struct {
	state, img, vmDir, disk string
	intents                 atomic.Int32
}

func newFlushFixture(t *testing.T) *flushFixture {
	t.Helper()
	f := &flushFixture{state: t.TempDir()}
	f.img = filepath.Join(f.state, "images", "x", "rootfs.ext4")
	f.vmDir = filepath.Join(f.state, "vms", "vm1")
	f.disk = filepath.Join(f.vmDir, blockdev.DiskFileName)
	if err := os.MkdirAll(filepath.Dir(f.img), 0o700); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 8<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *flushFixture) opts(deferSync bool) blockdev.PrepareOptions {
	return blockdev.PrepareOptions{VMID: "vm1", BaseImage: f.img, VMDir: f.vmDir, Driver: blockdev.DriverCopy, DeferSync: deferSync,
		Intent: func(blockdev.Disk) error { f.intents.Add(1); return nil }}
}

func exists(path string) bool { _, err := os.Stat(path); return err == nil }

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

// holdPromote makes every background flush stop between its fsync and its
// rename until the returned release is called.
func holdPromote(t *testing.T) (reached <-chan string, release func()) {
	r, gate := make(chan string, 4), make(chan struct{})
	blockdev.SetBeforePromote(func(disk string) { r <- disk; <-gate })
	var once atomic.Bool
	release = func() {
		if once.CompareAndSwap(false, true) {
			close(gate)
		}
	}
	t.Cleanup(func() { release(); blockdev.SetBeforePromote(nil) })
	return r, release
}

// TestDeferredFlush is create then start: Prepare with DeferSync leaves the
// whole copy as disk.ext4.unsynced and no disk.ext4; the flush runs in the
// background; a second Prepare (the start) waits for it, ticking, and then
// uses the promoted copy itself (same inode, no second copy).
func TestDeferredFlush(t *testing.T) {
	f := newFlushFixture(t)
	m := &blockdev.Manager{StateDir: f.state, Syncs: &blockdev.Syncer{}}
	ctx := context.Background()
	d, err := m.Prepare(ctx, f.opts(true))
	if err != nil {
		t.Fatal(err)
	}
	if exists(f.disk) || !exists(f.disk+blockdev.UnsyncedSuffix) {
		t.Fatalf("after a deferred Prepare: disk.ext4 exists %v, .unsynced exists %v; want only the .unsynced copy", exists(f.disk), exists(f.disk+blockdev.UnsyncedSuffix))
	}
	if sha(t, f.disk+blockdev.UnsyncedSuffix) != sha(t, f.img) {
		t.Fatal("the unsynced copy differs from the image")
	}
	ino := inode(t, f.disk+blockdev.UnsyncedSuffix)
	reached, release := holdPromote(t)
	if !m.FlushInBackground(d) {
		t.Fatal("FlushInBackground found nothing to flush")
	}
	if got := <-reached; got != f.disk {
		t.Fatalf("flushing %s, want %s", got, f.disk)
	}
	if !m.Syncs.Pending(f.disk) {
		t.Error("no flush pending while it is held")
	}
	var ticks atomic.Int32
	done := make(chan error, 1)
	go func() {
		o := f.opts(false)
		o.Waiting = func(time.Duration) { ticks.Add(1) }
		_, err := m.Prepare(ctx, o)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("start's Prepare returned (%v) while the flush was still running", err)
	case <-time.After(1500 * time.Millisecond):
	}
	if ticks.Load() == 0 {
		t.Error("Prepare waited without telling its Waiting hook")
	}
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !exists(f.disk) || exists(f.disk+blockdev.UnsyncedSuffix) {
		t.Fatalf("after the flush: disk.ext4 exists %v, .unsynced exists %v", exists(f.disk), exists(f.disk+blockdev.UnsyncedSuffix))
	}
	if inode(t, f.disk) != ino || f.intents.Load() != 1 || sha(t, f.disk) != sha(t, f.img) {
		t.Errorf("start did not use the flushed copy: inode %d (copy was %d), %d intents, same content %v", inode(t, f.disk), ino, f.intents.Load(), sha(t, f.disk) == sha(t, f.img))
	}
	if m.Syncs.Pending(f.disk) {
		t.Error("flush still pending after it finished")
	}
}

// TestUnflushedCopyNeverUsed is start after a crash: a disk.ext4.unsynced
// that no flush of this daemon is promoting (its data lost by a host crash:
// zeros here) is removed and the image copied again, with or without a
// Syncer.
func TestUnflushedCopyNeverUsed(t *testing.T) {
	for _, syncs := range []*blockdev.Syncer{{}, nil} {
		f := newFlushFixture(t)
		if err := os.MkdirAll(f.vmDir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f.disk+blockdev.UnsyncedSuffix, make([]byte, 8<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		m := &blockdev.Manager{StateDir: f.state, Syncs: syncs}
		d, err := m.Prepare(context.Background(), f.opts(false))
		if err != nil {
			t.Fatal(err)
		}
		if sha(t, d.Path) != sha(t, f.img) || exists(f.disk+blockdev.UnsyncedSuffix) || f.intents.Load() != 1 {
			t.Errorf("Syncer %v: the disk is not a fresh copy of the image (same %v), .unsynced left %v, %d intents",
				syncs != nil, sha(t, d.Path) == sha(t, f.img), exists(f.disk+blockdev.UnsyncedSuffix), f.intents.Load())
		}
	}
}

// TestCanceledFlushDoesNotPromote is rm (Teardown) and a restore from a
// snapshot (Cancel, then a disk put in place) while a flush is under way:
// the flush must not rename its copy over what is there afterwards.
func TestCanceledFlushDoesNotPromote(t *testing.T) {
	ctx := context.Background()
	t.Run("teardown", func(t *testing.T) {
		f := newFlushFixture(t)
		m := &blockdev.Manager{StateDir: f.state, Syncs: &blockdev.Syncer{}}
		d, err := m.Prepare(ctx, f.opts(true))
		if err != nil {
			t.Fatal(err)
		}
		reached, release := holdPromote(t)
		m.FlushInBackground(d)
		<-reached
		if err := m.Teardown(ctx, d); err != nil {
			t.Fatal(err)
		}
		release()
		if err := m.Syncs.WaitAll(ctx); err != nil {
			t.Fatal(err)
		}
		if exists(f.disk) || exists(f.disk+blockdev.UnsyncedSuffix) {
			t.Errorf("after Teardown during a flush: disk.ext4 exists %v, .unsynced exists %v; want neither", exists(f.disk), exists(f.disk+blockdev.UnsyncedSuffix))
		}
	})
	t.Run("replaced", func(t *testing.T) {
		f := newFlushFixture(t)
		m := &blockdev.Manager{StateDir: f.state, Syncs: &blockdev.Syncer{}}
		d, err := m.Prepare(ctx, f.opts(true))
		if err != nil {
			t.Fatal(err)
		}
		reached, release := holdPromote(t)
		m.FlushInBackground(d)
		<-reached
		m.Syncs.Cancel(f.disk)
		if err := os.WriteFile(f.disk, []byte("restored"), 0o600); err != nil {
			t.Fatal(err)
		}
		release()
		if err := m.Syncs.Wait(ctx, f.disk, nil); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(f.disk)
		if err != nil || string(got) != "restored" || exists(f.disk+blockdev.UnsyncedSuffix) {
			t.Errorf("after Cancel and a replaced disk: disk.ext4 = %.20q (%v), .unsynced exists %v; want the replacement, no .unsynced", got, err, exists(f.disk+blockdev.UnsyncedSuffix))
		}
	})
	t.Run("wait canceled", func(t *testing.T) {
		f := newFlushFixture(t)
		m := &blockdev.Manager{StateDir: f.state, Syncs: &blockdev.Syncer{}}
		d, err := m.Prepare(ctx, f.opts(true))
		if err != nil {
			t.Fatal(err)
		}
		reached, release := holdPromote(t)
		m.FlushInBackground(d)
		<-reached
		cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		if _, err := m.Prepare(cctx, f.opts(false)); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Prepare while the flush is held, with a 100 ms context = %v; want DeadlineExceeded", err)
		}
		release()
		if err := m.Syncs.WaitAll(ctx); err != nil || !exists(f.disk) {
			t.Errorf("the flush did not finish after its waiter gave up: %v, disk.ext4 exists %v", err, exists(f.disk))
		}
	})
}
