package blockdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

const (
	baseSuffix   = "-base" // the linear+zero device under a grown snapshot
	sectorSize   = 512
	snapChunk    = "8" // snapshot chunk size in sectors (4 KiB)
	dmMapperDir  = "/dev/mapper/"
	cowSlackBase = 8 << 20
)

var dmNameRE = regexp.MustCompile(`^banger-[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)

// prepareDM builds the dm-snapshot disk:
//
//	base loop (read-only) on VMDir/base.ext4.link, a hard link of the image
//	COW loop on VMDir/cow.img, a sparse file
//	[banger-<id>-base: 0 <img> linear <base loop> 0; <img> <extra> zero]  only when the disk is larger
//	banger-<id> (uuid BANGER-<id>): 0 <disk> snapshot <base> <cow loop> P 8
//
// then resize2fs on the snapshot when it is new and larger than the image.
// The per-VM hard link gives the read-only loop a backing file that is the
// VM's own, so teardown can find it by backing file even when several VMs
// share an image.
func (m *Manager) prepareDM(ctx context.Context, opts PrepareOptions, imageSize int64) (d Disk, err error) {
	if imageSize%sectorSize != 0 {
		return Disk{}, fmt.Errorf("prepare dm-snapshot: image %s is %d bytes, not whole sectors", opts.BaseImage, imageSize)
	}
	if _, err := os.Stat("/dev/mapper/control"); err != nil && m.Runner == nil {
		return Disk{}, fmt.Errorf("prepare dm-snapshot: %w: /dev/mapper/control is absent", ErrNotSupported)
	}
	name, uuid := DMNames(opts.VMID)
	d = Disk{
		Driver:   DriverDMSnapshot,
		Path:     dmMapperDir + name,
		COWPath:  filepath.Join(opts.VMDir, COWFileName),
		BaseLink: filepath.Join(opts.VMDir, BaseLinkName),
	}
	activated := false
	defer func() {
		if err != nil && activated {
			_ = m.Deactivate(context.WithoutCancel(ctx), d)
		}
	}()

	// Files: the base link and the COW file.
	if err := opts.Intent(d); err != nil {
		return Disk{}, fmt.Errorf("prepare dm-snapshot: record intent: %w", err)
	}
	if err := linkImage(opts.BaseImage, d.BaseLink); err != nil {
		return Disk{}, err
	}
	freshCOW, err := createCOW(d.COWPath, opts.SizeBytes)
	if err != nil {
		return Disk{}, err
	}

	// Loops, reusing ones already bound to our files (a restart).
	for _, l := range []Loop{{BackingFile: d.BaseLink, ReadOnly: true}, {BackingFile: d.COWPath}} {
		devs, err := m.loop().Find(l.BackingFile)
		if err != nil {
			return Disk{}, fmt.Errorf("prepare dm-snapshot: %w", err)
		}
		if len(devs) > 0 {
			l.Device = devs[0]
			d.Loops = append(d.Loops, l)
			continue
		}
		if err := opts.Intent(withLoop(d, l)); err != nil {
			return Disk{}, fmt.Errorf("prepare dm-snapshot: record intent: %w", err)
		}
		activated = true
		dev, err := m.loop().Attach(ctx, l.BackingFile, l.ReadOnly)
		if err != nil {
			return d, fmt.Errorf("prepare dm-snapshot: %w", err)
		}
		l.Device = dev
		d.Loops = append(d.Loops, l)
	}

	// Device-mapper devices.
	d.DMName, d.DMUUID = name, uuid
	if err := opts.Intent(d); err != nil {
		return d, fmt.Errorf("prepare dm-snapshot: record intent: %w", err)
	}
	activated = true
	imgSectors, diskSectors := imageSize/sectorSize, opts.SizeBytes/sectorSize
	base := d.Loops[0].Device
	if diskSectors > imgSectors {
		table := fmt.Sprintf("0 %d linear %s 0\n%d %d zero\n", imgSectors, base, imgSectors, diskSectors-imgSectors)
		if err := m.createDM(ctx, name+baseSuffix, uuid+baseSuffix, table); err != nil {
			return d, err
		}
		base = dmMapperDir + name + baseSuffix
	}
	table := fmt.Sprintf("0 %d snapshot %s %s P %s", diskSectors, base, d.Loops[1].Device, snapChunk)
	if err := m.createDM(ctx, name, uuid, table); err != nil {
		return d, err
	}
	if freshCOW && diskSectors > imgSectors {
		if err := m.resizeFS(ctx, d.Path); err != nil {
			return d, err
		}
	}
	return d, nil
}

func withLoop(d Disk, l Loop) Disk {
	d.Loops = append(append([]Loop(nil), d.Loops...), l)
	return d
}

// linkImage hard-links image to link, or checks that an existing link is
// the same file.
func linkImage(image, link string) error {
	err := os.Link(image, link)
	if errors.Is(err, os.ErrExist) {
		a, errA := os.Stat(image)
		b, errB := os.Stat(link)
		if errA == nil && errB == nil && os.SameFile(a, b) {
			return nil
		}
		return fmt.Errorf("prepare dm-snapshot: %s exists and is not a link of %s", link, image)
	}
	if err != nil {
		return fmt.Errorf("prepare dm-snapshot: link image into the VM dir (the image and VM dirs must share a filesystem): %w", err)
	}
	return nil
}

// createCOW creates the sparse COW file sized for a full rewrite of the
// disk plus exception-store metadata, unless it exists; it reports whether
// it is new.
func createCOW(path string, diskBytes int64) (bool, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if errors.Is(err, os.ErrExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("create COW file: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(diskBytes + diskBytes/64 + cowSlackBase); err != nil {
		return false, fmt.Errorf("size COW file %s: %w", path, err)
	}
	return true, f.Close()
}

// DMDevice is an active device-mapper device.
type DMDevice struct {
	Name, UUID string
	VMID       string // ListBangerDM: the VM its BANGER-<id> UUID names
}

// ListBangerDM returns the active device-mapper devices that carry
// banger's identity (a BANGER-<vm-id> UUID), with the VM id each names. On
// a host without device-mapper there are none, and no error.
func (m *Manager) ListBangerDM(ctx context.Context) ([]DMDevice, error) {
	if _, err := os.Stat("/dev/mapper/control"); err != nil && m.Runner == nil {
		return nil, nil
	}
	devs, err := m.ListDM(ctx)
	if err != nil {
		return nil, err
	}
	var ours []DMDevice
	for _, d := range devs {
		if id, ok := strings.CutPrefix(d.UUID, "BANGER-"); ok {
			d.VMID = id
			ours = append(ours, d)
		}
	}
	return ours, nil
}

// ListDM returns the active device-mapper devices with their UUIDs
// (dmsetup info -c --noheadings -o name,uuid).
func (m *Manager) ListDM(ctx context.Context) ([]DMDevice, error) {
	out, err := m.runner().Run(ctx, nil, "dmsetup", "info", "-c", "--noheadings", "-o", "name,uuid", "--separator", "|")
	if err != nil {
		return nil, fmt.Errorf("list dm devices: %w", err)
	}
	var devs []DMDevice
	for _, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		name, uuid, ok := strings.Cut(line, "|")
		if !ok {
			continue // blank, or "No devices found"
		}
		devs = append(devs, DMDevice{Name: name, UUID: uuid})
	}
	return devs, nil
}

func (m *Manager) findDM(ctx context.Context, name string) (DMDevice, bool, error) {
	devs, err := m.ListDM(ctx)
	if err != nil {
		return DMDevice{}, false, err
	}
	for _, d := range devs {
		if d.Name == name {
			return d, true, nil
		}
	}
	return DMDevice{}, false, nil
}

func checkDMIdentity(name, uuid string) error {
	if !dmNameRE.MatchString(strings.TrimSuffix(name, baseSuffix)) || uuid != "BANGER-"+strings.TrimPrefix(name, "banger-") {
		return fmt.Errorf("dm device %q with uuid %q: not a banger name/uuid pair: %w", name, uuid, ErrNotOurs)
	}
	return nil
}

// createDM creates the dm device, or accepts an existing one with the same
// UUID.
func (m *Manager) createDM(ctx context.Context, name, uuid, table string) error {
	if err := checkDMIdentity(name, uuid); err != nil {
		return err
	}
	unlock, err := lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	cur, exists, err := m.findDM(ctx, name)
	if err != nil {
		return err
	}
	if exists {
		if cur.UUID != uuid {
			return fmt.Errorf("create dm device %s: one exists with uuid %q, not %q: %w", name, cur.UUID, uuid, ErrNotOurs)
		}
		return nil
	}
	args := []string{"create", name, "--uuid", uuid}
	var stdin []byte
	if strings.Count(strings.TrimSpace(table), "\n") == 0 {
		args = append(args, "--table", table)
	} else {
		stdin = []byte(table) // multi-target tables go on standard input
	}
	if _, err := m.runner().Run(ctx, stdin, "dmsetup", args...); err != nil {
		return fmt.Errorf("create dm device %s: %w", name, err)
	}
	// Make sure /dev/mapper/<name> exists where udev does not run.
	if _, err := m.runner().Run(ctx, nil, "dmsetup", "mknodes", name); err != nil {
		return fmt.Errorf("create node for dm device %s: %w", name, err)
	}
	return nil
}

// removeDM removes the dm device name if, and only if, its UUID is uuid
// and both are a banger pair; a missing device counts as removed.
func (m *Manager) removeDM(ctx context.Context, name, uuid string) error {
	if err := checkDMIdentity(name, uuid); err != nil {
		return err
	}
	unlock, err := lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	cur, exists, err := m.findDM(ctx, name)
	if err != nil || !exists {
		return err
	}
	if cur.UUID != uuid {
		return fmt.Errorf("remove dm device %s: its uuid is %q, not %q: %w", name, cur.UUID, uuid, ErrNotOurs)
	}
	if _, err := m.runner().Run(ctx, nil, "dmsetup", "remove", "--retry", name); err != nil {
		if _, still, ferr := m.findDM(ctx, name); ferr == nil && !still {
			return nil // gone meanwhile
		}
		return fmt.Errorf("remove dm device %s: %w", name, err)
	}
	return nil
}
