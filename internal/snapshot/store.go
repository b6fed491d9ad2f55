package snapshot

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/bangerdev/banger/internal/atomicfile"
)

// Store keeps snapshots in one directory (<state>/snapshots), one
// sub-directory per snapshot named by its id.
type Store struct {
	// Dir holds the snapshots; it is created when missing.
	Dir string
	// Failpoint, when set, is called at each named step of Take and
	// Restore (crash-injection tests kill the process there).
	Failpoint func(name string)

	mu sync.Mutex // serializes name checks and phase changes

	vmu      sync.Mutex
	verified map[string]verifiedFile // files Verify has hashed, unchanged since
}

// The failpoints, in the order Take and Restore reach them.
const (
	FailTakeIntent    = "snapshot:intent"    // record "creating" written, no file yet
	FailTakePaused    = "snapshot:paused"    // guest paused, state written, disk copy not started
	FailTakeCopied    = "snapshot:copied"    // guest resumed, files whole, record still "creating"
	FailRestoreDisk   = "restore:disk"       // snapshot verified, the new VM's disk copied, no monitor
	FailRemoveDeleted = "snapshot:rm-intent" // record "deleting" written, files not removed
)

func (s *Store) failpoint(name string) {
	if s.Failpoint != nil {
		s.Failpoint(name)
	}
}

// NewStore returns a store over dir.
func NewStore(dir string) *Store { return &Store{Dir: dir} }

func (s *Store) dir(id string) string { return filepath.Join(s.Dir, id) }

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// writeRecord writes snap's record atomically.
func (s *Store) writeRecord(snap Snapshot) error {
	b, err := json.MarshalIndent(snap, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(s.dir(snap.ID), RecordName), append(b, '\n'), 0o600)
}

// readRecord reads the record in dir id; a record that does not parse or
// names another id is an error.
func (s *Store) readRecord(id string) (Snapshot, error) {
	b, err := os.ReadFile(filepath.Join(s.dir(id), RecordName)) //nolint:gosec // id is checked by the callers
	if err != nil {
		return Snapshot{}, err
	}
	var snap Snapshot
	if err := json.Unmarshal(b, &snap); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot record %s: %w", id, err)
	}
	if snap.ID != id {
		return Snapshot{}, fmt.Errorf("snapshot record in %s names id %q", id, snap.ID)
	}
	return snap, nil
}

// all returns every readable record, ready or not, and the names of the
// entries that hold no readable record.
func (s *Store) all() (snaps []Snapshot, unreadable []string, err error) {
	ents, err := os.ReadDir(s.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("list snapshots: %w", err)
	}
	for _, e := range ents {
		if !e.IsDir() || !idRE.MatchString(e.Name()) {
			unreadable = append(unreadable, e.Name())
			continue
		}
		snap, err := s.readRecord(e.Name())
		if err != nil {
			unreadable = append(unreadable, e.Name())
			continue
		}
		snaps = append(snaps, snap)
	}
	sort.Slice(snaps, func(i, j int) bool { return snaps[i].CreatedAt.Before(snaps[j].CreatedAt) })
	return snaps, unreadable, nil
}

// List returns the ready snapshots, oldest first. A snapshot still being
// written, or being removed, is not listed.
func (s *Store) List() ([]Snapshot, error) {
	all, _, err := s.all()
	if err != nil {
		return nil, err
	}
	var ready []Snapshot
	for _, snap := range all {
		if snap.Phase == PhaseReady {
			ready = append(ready, snap)
		}
	}
	return ready, nil
}

// Get finds a ready snapshot by name or id.
func (s *Store) Get(ref string) (Snapshot, error) {
	ready, err := s.List()
	if err != nil {
		return Snapshot{}, err
	}
	for _, snap := range ready {
		if snap.Name == ref {
			return snap, nil
		}
	}
	for _, snap := range ready {
		if snap.ID == ref {
			return snap, nil
		}
	}
	return Snapshot{}, fmt.Errorf("snapshot %q (see banger snapshot ls): %w", ref, ErrNotFound)
}

// Path returns the snapshot's directory.
func (s *Store) Path(snap Snapshot) string { return s.dir(snap.ID) }

// Remove deletes a ready snapshot: the record goes to "deleting" first, so
// a crash half-way leaves a dir that Reconcile finishes removing and that
// is never listed. inUse, when set, names the VMs that still depend on the
// snapshot's files; they make Remove refuse unless force.
func (s *Store) Remove(ref string, force bool, inUse func(Snapshot) []string) (Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap, err := s.Get(ref)
	if err != nil {
		return Snapshot{}, err
	}
	if inUse != nil && !force {
		if vms := inUse(snap); len(vms) > 0 {
			return Snapshot{}, fmt.Errorf("snapshot %q: VMs %v run from its files (stop them first, or rm --force): %w", snap.Name, vms, ErrInUse)
		}
	}
	snap.Phase = PhaseDeleting
	if err := s.writeRecord(snap); err != nil {
		return Snapshot{}, fmt.Errorf("remove snapshot %q: %w", snap.Name, err)
	}
	s.failpoint(FailRemoveDeleted)
	if err := os.RemoveAll(s.dir(snap.ID)); err != nil {
		return Snapshot{}, fmt.Errorf("remove snapshot %q: %w", snap.Name, err)
	}
	return snap, atomicfile.SyncDir(s.Dir)
}

// Leftover is what Reconcile removed: a snapshot that was being written
// or removed when the daemon stopped, or an entry with no readable record.
type Leftover struct {
	Entry string
	// Snapshot is the record found, if any: Source names the VM that may
	// have been left paused by an interrupted snapshot.
	Snapshot *Snapshot
}

// Reconcile removes what an interrupted Take or Remove left: every entry
// of the store without a ready record. Call it at daemon start-up, before
// anything else uses the store. The daemon resumes the VMs named by
// leftovers of phase "creating" (vmm.Snapshotter.Resume).
func (s *Store) Reconcile() ([]Leftover, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	all, unreadable, err := s.all()
	if err != nil {
		return nil, err
	}
	var left []Leftover
	var errs []error
	for _, snap := range all {
		if snap.Phase == PhaseReady {
			continue
		}
		if err := os.RemoveAll(s.dir(snap.ID)); err != nil {
			errs = append(errs, err)
			continue
		}
		left = append(left, Leftover{Entry: snap.ID, Snapshot: &snap})
	}
	for _, name := range unreadable {
		// Only names of our form are removed (a dir made just before its
		// record): anything else is not proven to be banger's.
		if !idRE.MatchString(name) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(s.Dir, name)); err != nil {
			errs = append(errs, err)
			continue
		}
		left = append(left, Leftover{Entry: name})
	}
	if len(left) > 0 {
		if err := atomicfile.SyncDir(s.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	return left, errors.Join(errs...)
}
