package blockdev_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/bangerdev/banger/internal/blockdev"
)

// BenchmarkDiskPrepare times preparing a VM disk (same size as the image,
// so no resize) from the Debian test image with each driver available here,
// against `cp --sparse=always` of the same file in the same run: flushed
// before Prepare returns (copy, reflink: a start's copy), left to the
// background flush (-deferred: vm create's copy) and never flushed
// (-nosync: the copy alone).
func BenchmarkDiskPrepare(b *testing.B) {
	ext4 := b.TempDir()
	img := stageImage(b, ext4)
	bench := func(b *testing.B, state, img, driver string, deferSync bool) {
		m := &blockdev.Manager{StateDir: state}
		if deferSync {
			m.Syncs = &blockdev.Syncer{}
		}
		ctx := context.Background()
		i := 0
		for b.Loop() {
			vmDir := filepath.Join(state, "vms", fmt.Sprint(i))
			i++
			if driver == "cp" {
				if err := os.MkdirAll(vmDir, 0o700); err != nil {
					b.Fatal(err)
				}
				if out, err := exec.Command("cp", "--sparse=always", img, filepath.Join(vmDir, "disk.ext4")).CombinedOutput(); err != nil {
					b.Fatalf("cp: %v %s", err, out)
				}
				b.StopTimer()
				_ = os.RemoveAll(vmDir)
				b.StartTimer()
				continue
			}
			d, err := m.Prepare(ctx, blockdev.PrepareOptions{VMID: "bench", BaseImage: img, VMDir: vmDir, Driver: driver, DeferSync: deferSync})
			if err != nil {
				b.Fatal(err)
			}
			m.FlushInBackground(d)
			b.StopTimer()
			// The flush is not vm create's time, but it must not pile
			// up under the next iterations either.
			if err := m.Syncs.WaitAll(ctx); err != nil {
				b.Fatal(err)
			}
			if err := m.Teardown(ctx, d); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	}
	b.Run("ext4/copy", func(b *testing.B) { bench(b, ext4, img, blockdev.DriverCopy, false) })
	b.Run("ext4/copy-deferred", func(b *testing.B) { bench(b, ext4, img, blockdev.DriverCopy, true) })
	b.Run("ext4/copy-nosync", func(b *testing.B) {
		defer blockdev.SetSyncWrites(blockdev.SetSyncWrites(false))
		bench(b, ext4, img, blockdev.DriverCopy, false)
	})
	b.Run("ext4/cp-sparse", func(b *testing.B) { bench(b, ext4, img, "cp", false) })
	b.Run("xfs/reflink", func(b *testing.B) {
		xfs := xfsStateDir(b)
		bench(b, xfs, stageImage(b, xfs), blockdev.DriverReflink, false)
	})
	b.Run("xfs/reflink-deferred", func(b *testing.B) {
		xfs := xfsStateDir(b)
		bench(b, xfs, stageImage(b, xfs), blockdev.DriverReflink, true)
	})
	b.Run("xfs/reflink-nosync", func(b *testing.B) {
		defer blockdev.SetSyncWrites(blockdev.SetSyncWrites(false))
		xfs := xfsStateDir(b)
		bench(b, xfs, stageImage(b, xfs), blockdev.DriverReflink, false)
	})
	b.Run("xfs/cp-sparse", func(b *testing.B) {
		xfs := xfsStateDir(b)
		bench(b, xfs, stageImage(b, xfs), "cp", false)
	})
}
