package blockdev

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// UnsyncedSuffix names a disk copy that is whole in the page cache but not
// yet flushed: <disk>.unsynced. Only the Syncer that is flushing it may
// promote it (fsync the file, rename it to <disk>, fsync the directory);
// anything else that finds one (a later Prepare, start-up recovery) must
// treat it as garbage, since after a host crash its contents are
// whatever reached the disk.
const UnsyncedSuffix = ".unsynced"

// Syncer flushes deferred disk copies in the background (a nil *Syncer
// has nothing pending), so that vm create
// returns once the copy is made instead of after its fsync. It lives as
// long as the daemon; a disk whose flush it was running when the daemon
// died is found by start-up recovery as <disk>.unsynced and removed, and
// the VM's next start copies the image again.
type Syncer struct {
	Log *slog.Logger // nil means slog.Default()

	mu      sync.Mutex
	jobs    map[string]*syncJob // promotions of <disk>.unsynced, by the final disk path
	flushes map[string]*syncJob // in-place flushes (Flush), by disk path
}

type syncJob struct {
	done     chan struct{}
	began    time.Time
	mu       sync.Mutex // held from the cancel check through the rename
	canceled bool
	// now, for a flush that waits before it starts (FlushAfter), is
	// closed to start it at once: someone waits for it, or it is canceled.
	now     chan struct{}
	nowOnce sync.Once
}

// hurry starts a delayed flush now (nothing for another job).
func (j *syncJob) hurry() {
	if j != nil && j.now != nil {
		j.nowOnce.Do(func() { close(j.now) })
	}
}

// errSyncCanceled is a flush whose disk was removed (or replaced) before it
// finished.
var errSyncCanceled = errors.New("canceled: the disk was removed")

func (s *Syncer) log() *slog.Logger {
	if s.Log == nil {
		return slog.Default()
	}
	return s.Log
}

// Start flushes disk+UnsyncedSuffix in the background and then promotes it
// to disk. A flush that fails removes the unsynced copy (the VM's start
// copies the image again) and logs why.
func (s *Syncer) Start(disk string) {
	j := &syncJob{done: make(chan struct{}), began: time.Now()}
	s.mu.Lock()
	if s.jobs == nil {
		s.jobs = map[string]*syncJob{}
	}
	s.jobs[disk] = j
	s.mu.Unlock()
	go func() {
		err := s.promote(j, disk)
		s.mu.Lock()
		if s.jobs[disk] == j {
			delete(s.jobs, disk)
		}
		s.mu.Unlock()
		close(j.done)
		took := time.Since(j.began).Round(time.Millisecond)
		switch {
		case err == nil:
			s.log().Info("disk flushed", "disk", disk, "took", took)
		case errors.Is(err, errSyncCanceled):
			s.log().Info("disk flush abandoned: the disk was removed", "disk", disk)
		default:
			s.log().Warn("disk flush failed; the unsynced copy was removed and the VM's start copies the image again", "disk", disk, "err", err)
		}
	}()
}

func (s *Syncer) promote(j *syncJob, disk string) error {
	unsynced := disk + UnsyncedSuffix
	err := fsyncPath(unsynced)
	if beforePromote != nil {
		beforePromote(disk)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if err == nil && j.canceled {
		err = errSyncCanceled
	}
	if err == nil {
		err = os.Rename(unsynced, disk)
	}
	if err == nil {
		// The data is on disk before the rename; the directory's fsync
		// makes the new name durable. Failing it leaves a whole disk.
		if derr := fsyncPath(filepath.Dir(disk)); derr != nil {
			s.log().Warn("fsync of the VM dir after promoting its disk failed", "disk", disk, "err", derr)
		}
		return nil
	}
	_ = os.Remove(unsynced)
	return err
}

// Pending reports whether a flush of disk is under way.
func (s *Syncer) Pending(disk string) bool {
	if s == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.jobs[disk] != nil
}

// Wait waits until no flush of disk is under way (nil at once if none is).
// While it waits, tick is called about every second with the time the
// flush has taken so far (nil: no ticks). It returns ctx's error if ctx
// ends first; the flush goes on.
func (s *Syncer) Wait(ctx context.Context, disk string, tick func(elapsed time.Duration)) error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	j := s.jobs[disk]
	s.mu.Unlock()
	if j == nil {
		return nil
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-j.done:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("wait for the flush of %s: %w", disk, ctx.Err())
		case <-t.C:
			if tick != nil {
				tick(time.Since(j.began))
			}
		}
	}
}

// Cancel stops a flush of disk from promoting its copy: once Cancel returns
// the copy has either been renamed to disk already or never will be, so
// the caller can remove or replace disk. An in-place flush (Flush) is
// likewise kept from removing the disk's marker. The fsync itself runs on; it
// does not wait for that.
func (s *Syncer) Cancel(disk string) {
	if s == nil {
		return
	}
	s.mu.Lock()
	jobs := []*syncJob{s.jobs[disk], s.flushes[disk]}
	s.mu.Unlock()
	for _, j := range jobs {
		if j != nil {
			j.mu.Lock()
			j.canceled = true
			j.mu.Unlock()
			j.hurry()
		}
	}
}

// WaitAll waits for every flush under way, until ctx ends (daemon
// shutdown, so that a clean restart does not throw copies away).
func (s *Syncer) WaitAll(ctx context.Context) error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	var disks, flushes []string
	for d := range s.jobs {
		disks = append(disks, d)
	}
	for d := range s.flushes {
		flushes = append(flushes, d)
	}
	s.mu.Unlock()
	for _, d := range disks {
		if err := s.Wait(ctx, d, nil); err != nil {
			return err
		}
	}
	for _, d := range flushes {
		if err := s.Flushing(ctx, d); err != nil {
			return err
		}
	}
	return nil
}

// beforePromote, when set (tests only), runs between a flush's fsync and
// its cancel check and rename.
var beforePromote func(disk string)

func fsyncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
