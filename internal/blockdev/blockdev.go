// Package blockdev prepares and tears down the copy-on-write disks VMs boot
// from: a device-mapper snapshot over loop devices where device-mapper is
// available, otherwise a per-VM copy of the image (a reflink where the
// filesystem supports it, else a sparse copy), grown to the requested size.
//
// banger only ever removes what it can prove it created: loop devices are
// found by their backing file (/sys/block/loopN/loop/backing_file), which
// must lie under the state directory; dm devices by name and UUID
// (banger-<vm-id>, BANGER-<vm-id>). Every teardown step is idempotent and
// treats "already gone" as success. Before each resource is created the
// caller's Intent hook is told what is about to exist, so a crash between
// creating and recording leaves enough on disk to find it again.
package blockdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/bangerdev/banger/internal/subpath"
)

// Disk drivers.
const (
	DriverAuto       = "auto"
	DriverDMSnapshot = "dm-snapshot"
	DriverReflink    = "reflink"
	DriverCopy       = "copy"
)

// Names of the per-VM files Prepare creates in PrepareOptions.VMDir.
const (
	DiskFileName = "disk.ext4"      // copy and reflink drivers: the VM's own copy
	COWFileName  = "cow.img"        // dm-snapshot: the snapshot's exception store
	BaseLinkName = "base.ext4.link" // dm-snapshot: per-VM hard link of the image, behind the read-only loop
)

// Sentinel errors; test them with errors.Is.
var (
	// ErrNotOurs means a device or file is not provably banger's (backing
	// file outside the state dir, wrong dm UUID); it was left alone.
	ErrNotOurs = errors.New("not created by banger")
	// ErrNotSupported means the requested driver cannot work on this host.
	ErrNotSupported = errors.New("not supported on this host")
	// ErrInvalidVMID means a VM id has characters banger does not accept.
	ErrInvalidVMID = errors.New("invalid VM id")
	// ErrDiskTooSmall means the requested disk is smaller than the image.
	ErrDiskTooSmall = errors.New("disk size is smaller than the image")
)

// Disk is a prepared VM disk and everything teardown needs to remove it. A
// VM's record keeps it as it is (model.Runtime.Disk); BaseLink is also the
// backing file of the read-only loop.
type Disk struct {
	Driver   string `json:"driver"`              // DriverDMSnapshot, DriverReflink or DriverCopy
	Path     string `json:"path"`                // what the VM boots: /dev/mapper/banger-<id> or the disk file
	COWPath  string `json:"cow_path,omitempty"`  // the VM's writable layer: COW file or disk copy
	BaseLink string `json:"base_link,omitempty"` // dm-snapshot: hard link of the image in the VM dir
	Loops    []Loop `json:"loops,omitempty"`     // dm-snapshot: base (read-only) and COW loops
	DMName   string `json:"dm_name,omitempty"`   // dm-snapshot: banger-<vm-id>
	DMUUID   string `json:"dm_uuid,omitempty"`   // dm-snapshot: BANGER-<vm-id>
}

// PrepareOptions says which disk to prepare.
type PrepareOptions struct {
	VMID      string // validated with ValidateVMID
	BaseImage string // the published rootfs.ext4; never written
	VMDir     string // where per-VM files go; must be under the Manager's StateDir
	SizeBytes int64  // disk size; 0 means the image's size; never smaller than the image
	Driver    string // DriverAuto ("" too), DriverDMSnapshot, DriverReflink or DriverCopy
	// Intent is called before each resource is created with the Disk as
	// it will be once that resource exists, so that the caller can
	// persist it first. An error aborts Prepare. Nil means no hook.
	Intent func(Disk) error
	// DeferSync (copy and reflink drivers, with a Manager.Syncs) leaves a
	// new copy as <disk>.unsynced, unflushed, for FlushInBackground: the
	// caller records the disk first. Without it the copy is flushed and
	// in place before Prepare returns.
	DeferSync bool
	// Waiting is called about every second while Prepare waits for a
	// background flush of this disk (nil: not told).
	Waiting func(elapsed time.Duration)
}

// Manager prepares and tears down disks under one state directory.
type Manager struct {
	// StateDir is banger's state directory. Loops backed by files outside
	// it are never detached; files outside it are never removed.
	StateDir string
	// Runner runs dmsetup, e2fsck and resize2fs. Nil means ExecRunner.
	Runner Runner
	// Syncs runs the background flushes of disks prepared with DeferSync
	// and makes Prepare wait for one of the same disk. Nil means every
	// copy is flushed before Prepare returns.
	Syncs *Syncer

	loops loopBackend // nil means the kernel; tests substitute a recorder
}

func (m *Manager) runner() Runner {
	if m.Runner == nil {
		return ExecRunner{}
	}
	return m.Runner
}

func (m *Manager) loop() loopBackend {
	if m.loops == nil {
		return kernelLoops{}
	}
	return m.loops
}

var vmIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)

// ValidateVMID checks that id is 1 to 64 letters, digits, '_' or '-',
// starting with a letter or digit: safe in dm names, UUIDs and file names.
func ValidateVMID(id string) error {
	if !vmIDRE.MatchString(id) {
		return fmt.Errorf("%w: %q (want 1-64 letters, digits, '_' or '-')", ErrInvalidVMID, id)
	}
	return nil
}

// DMNames returns the dm device name and UUID of a VM's snapshot.
func DMNames(vmID string) (name, uuid string) { return "banger-" + vmID, "BANGER-" + vmID }

// Prepare makes the VM's disk with the chosen driver (DetectDriver's choice
// for DriverAuto) and returns it. If the VM's disk already exists (a VM
// started again) it is reused, grown if SizeBytes asks for more, and
// reactivated; nothing is copied twice. On failure, devices Prepare
// activated are deactivated again; files stay for Teardown.
func (m *Manager) Prepare(ctx context.Context, opts PrepareOptions) (Disk, error) {
	if err := ValidateVMID(opts.VMID); err != nil {
		return Disk{}, err
	}
	if m.StateDir == "" {
		return Disk{}, errors.New("prepare disk: Manager.StateDir is empty")
	}
	if !isUnder(canonical(opts.VMDir), canonical(m.StateDir)) {
		return Disk{}, fmt.Errorf("prepare disk: VM dir %q is not under the state dir %q: %w", opts.VMDir, m.StateDir, ErrNotOurs)
	}
	st, err := os.Stat(opts.BaseImage)
	if err != nil {
		return Disk{}, fmt.Errorf("prepare disk: base image: %w", err)
	}
	if !st.Mode().IsRegular() {
		return Disk{}, fmt.Errorf("prepare disk: base image %s is not a regular file", opts.BaseImage)
	}
	if opts.SizeBytes == 0 {
		opts.SizeBytes = st.Size()
	}
	opts.SizeBytes &^= 4095 // whole filesystem blocks
	if opts.SizeBytes < st.Size() {
		return Disk{}, fmt.Errorf("prepare disk of %d bytes from %s (%d bytes): %w", opts.SizeBytes, opts.BaseImage, st.Size(), ErrDiskTooSmall)
	}
	if opts.Intent == nil {
		opts.Intent = func(Disk) error { return nil }
	}
	if err := os.MkdirAll(opts.VMDir, 0o700); err != nil {
		return Disk{}, fmt.Errorf("prepare disk: %w", err)
	}
	driver := opts.Driver
	if driver == "" || driver == DriverAuto {
		driver, _ = m.DetectDriver(ctx)
	}
	switch driver {
	case DriverDMSnapshot:
		return m.prepareDM(ctx, opts, st.Size())
	case DriverReflink, DriverCopy:
		return m.prepareCopy(ctx, opts, driver)
	default:
		return Disk{}, fmt.Errorf("prepare disk: unknown driver %q (want %s, %s, %s or %s)", driver, DriverAuto, DriverDMSnapshot, DriverReflink, DriverCopy)
	}
}

// Deactivate releases the disk's devices (dm devices, then loops) and
// keeps its files, so the VM can start again later. Every step runs even
// if an earlier one failed; the errors are joined.
func (m *Manager) Deactivate(ctx context.Context, d Disk) error {
	var errs []error
	if d.DMName != "" {
		errs = append(errs, m.removeDM(ctx, d.DMName, d.DMUUID))
		errs = append(errs, m.removeDM(ctx, d.DMName+baseSuffix, d.DMUUID+baseSuffix))
	}
	for _, l := range d.Loops {
		errs = append(errs, m.detachByBacking(ctx, l.BackingFile))
	}
	return errors.Join(errs...)
}

// Teardown removes the disk for good: dm devices first, then loops, then
// the per-VM files (COW file or disk copy, base link). Everything already
// gone counts as removed; every step runs even if an earlier one failed.
// Files outside the state dir are refused with ErrNotOurs.
func (m *Manager) Teardown(ctx context.Context, d Disk) error {
	errs := []error{m.Deactivate(ctx, d)}
	if d.COWPath != "" && (d.Driver == DriverCopy || d.Driver == DriverReflink) {
		if m.Syncs != nil {
			m.Syncs.Cancel(d.COWPath)
		}
		errs = append(errs, m.removeFile(d.COWPath+UnsyncedSuffix))
	}
	baseLink := d.BaseLink
	if baseLink == "" && d.COWPath != "" {
		for _, l := range d.Loops {
			if l.ReadOnly && filepath.Base(l.BackingFile) == BaseLinkName && filepath.Dir(l.BackingFile) == filepath.Dir(d.COWPath) {
				baseLink = l.BackingFile
			}
		}
	}
	for _, f := range []string{d.COWPath, baseLink} {
		if f != "" {
			errs = append(errs, m.removeFile(f))
		}
	}
	if d.COWPath != "" && (d.Driver == DriverCopy || d.Driver == DriverReflink) {
		// The marker goes after the disk: a disk file left behind stays
		// marked unflushed.
		if _, err := os.Stat(d.COWPath); errors.Is(err, os.ErrNotExist) {
			errs = append(errs, m.removeFile(d.COWPath+UnflushedSuffix))
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) removeFile(path string) error {
	if !isUnder(canonical(path), canonical(m.StateDir)) {
		return fmt.Errorf("remove %s: not under the state dir %s: %w", path, m.StateDir, ErrNotOurs)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// canonical returns path made absolute, cleaned and with symlinks resolved
// as far as it exists, the form the kernel reports backing files in.
func canonical(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return filepath.Clean(path)
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		return r
	}
	if r, err := filepath.EvalSymlinks(filepath.Dir(abs)); err == nil {
		return filepath.Join(r, filepath.Base(abs))
	}
	return abs
}

// isUnder reports whether path lies strictly inside dir. Both must be
// clean absolute paths; "/var/lib/banger-evil" is not under "/var/lib/banger".
func isUnder(path, dir string) bool {
	return filepath.IsAbs(path) && filepath.IsAbs(dir) && subpath.Inside(dir, path)
}
