package blockdev_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/blockdev"
)

// TestUnflushedDisk walks a disk written in place without a flush (a disk
// restored from a snapshot) through its marker's life: the background flush
// removes the marker; at start-up a marker of this boot is flushed and
// removed with the disk kept, one of another boot (a host crash) takes the
// disk with it; Teardown removes the marker once the disk is gone.
func TestUnflushedDisk(t *testing.T) {
	ctx := context.Background()
	const boot = "11111111-2222-4333-8444-555555555555"
	setup := func(t *testing.T) (state, disk string) {
		t.Helper()
		state = t.TempDir()
		disk = filepath.Join(state, "vms", "vm1", blockdev.DiskFileName)
		if err := os.MkdirAll(filepath.Dir(disk), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := blockdev.MarkUnflushed(disk, boot); err != nil {
			t.Fatalf("MarkUnflushed(%s): %v", disk, err)
		}
		if err := os.WriteFile(disk, []byte("restored disk"), 0o600); err != nil {
			t.Fatal(err)
		}
		return state, disk
	}
	t.Run("background flush", func(t *testing.T) {
		_, disk := setup(t)
		s := &blockdev.Syncer{}
		s.Flush(disk)
		if err := s.Flushing(ctx, disk); err != nil {
			t.Fatal(err)
		}
		if !exists(disk) || exists(disk+blockdev.UnflushedSuffix) {
			t.Errorf("after Flush: disk exists %v, marker exists %v; want the disk only", exists(disk), exists(disk+blockdev.UnflushedSuffix))
		}
	})
	t.Run("delayed flush", func(t *testing.T) {
		// A delayed flush has not started before its delay ends; someone
		// waiting for it (Flushing) starts it at once.
		_, disk := setup(t)
		s := &blockdev.Syncer{}
		s.FlushAfter(disk, time.Hour)
		time.Sleep(50 * time.Millisecond)
		if !exists(disk + blockdev.UnflushedSuffix) {
			t.Fatal("a flush delayed by an hour ran at once")
		}
		began := time.Now()
		if err := s.Flushing(ctx, disk); err != nil {
			t.Fatal(err)
		}
		if time.Since(began) > 10*time.Second || exists(disk+blockdev.UnflushedSuffix) {
			t.Errorf("Flushing a delayed flush: took %v, marker exists %v; want it started at once and done", time.Since(began), exists(disk+blockdev.UnflushedSuffix))
		}
	})
	t.Run("delayed flush canceled", func(t *testing.T) {
		// Canceled while it waits: it ends without touching the marker.
		_, disk := setup(t)
		s := &blockdev.Syncer{}
		s.FlushAfter(disk, time.Hour)
		s.Cancel(disk)
		if err := s.Flushing(ctx, disk); err != nil {
			t.Fatal(err)
		}
		if !exists(disk + blockdev.UnflushedSuffix) {
			t.Error("a canceled flush removed the marker")
		}
	})
	t.Run("same boot", func(t *testing.T) {
		_, disk := setup(t)
		out, err := blockdev.ReconcileUnflushed(disk+blockdev.UnflushedSuffix, boot)
		if err != nil || out != blockdev.UnflushedFlushed {
			t.Fatalf("ReconcileUnflushed in the boot that wrote it = %v, %v; want UnflushedFlushed", out, err)
		}
		if b, _ := os.ReadFile(disk); string(b) != "restored disk" || exists(disk+blockdev.UnflushedSuffix) {
			t.Errorf("after ReconcileUnflushed (same boot): disk %q, marker exists %v; want the disk kept, no marker", b, exists(disk+blockdev.UnflushedSuffix))
		}
	})
	t.Run("another boot", func(t *testing.T) {
		_, disk := setup(t)
		out, err := blockdev.ReconcileUnflushed(disk+blockdev.UnflushedSuffix, "99999999-2222-4333-8444-555555555555")
		if err != nil || out != blockdev.UnflushedRemoved {
			t.Fatalf("ReconcileUnflushed after a reboot = %v, %v; want UnflushedRemoved", out, err)
		}
		if exists(disk) || exists(disk+blockdev.UnflushedSuffix) {
			t.Errorf("after ReconcileUnflushed (another boot): disk exists %v, marker exists %v; want neither", exists(disk), exists(disk+blockdev.UnflushedSuffix))
		}
	})
	t.Run("empty marker", func(t *testing.T) {
		// A marker whose contents a crash lost reads as another boot's.
		_, disk := setup(t)
		if err := os.WriteFile(disk+blockdev.UnflushedSuffix, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if out, err := blockdev.ReconcileUnflushed(disk+blockdev.UnflushedSuffix, boot); err != nil || out != blockdev.UnflushedRemoved || exists(disk) {
			t.Errorf("ReconcileUnflushed of an empty marker = %v, %v (disk exists %v); want UnflushedRemoved and no disk", out, err, exists(disk))
		}
	})
	t.Run("teardown", func(t *testing.T) {
		state, disk := setup(t)
		m := &blockdev.Manager{StateDir: state, Syncs: &blockdev.Syncer{}}
		d := blockdev.Disk{Driver: blockdev.DriverCopy, Path: disk, COWPath: disk}
		if err := m.Teardown(ctx, d); err != nil {
			t.Fatal(err)
		}
		if exists(disk) || exists(disk+blockdev.UnflushedSuffix) {
			t.Errorf("after Teardown: disk exists %v, marker exists %v; want neither", exists(disk), exists(disk+blockdev.UnflushedSuffix))
		}
	})
}
