package mounts

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/bangerdev/banger/internal/mountinfo"
)

// readAheadKB is the guest kernel's read-ahead for a mount, in KiB. A FUSE
// mount's backing device starts at the kernel's default of 128 KiB, so a
// sequential read reaches the agent as one 128 KiB FUSE request at a time,
// each a trip through /dev/fuse and the agent. At the 1 MiB that the mount
// offers (MaxReadAhead below, and 1 MiB requests by MaxWrite)
// the kernel asks for 1 MiB at a time, ahead of the reader: measured under
// TCG, 64 MiB read 20% faster with 20-30% less guest CPU per byte.
const readAheadKB = 1024

// setReadAhead sets the read-ahead of the FUSE mount at dir (the latest
// mount there) to readAheadKB through its backing device's sysfs entry. It
// finds the device in /proc/self/mountinfo, so it never touches the mount
// itself (at boot nothing serves it yet, and a stat would wait).
func setReadAhead(root, dir string) error {
	mi, err := os.ReadFile(filepath.Join(root, "proc/self/mountinfo"))
	if err != nil {
		return fmt.Errorf("read-ahead of %s: %w", dir, err)
	}
	dev := mountDevice(mi, dir)
	if dev == "" {
		return fmt.Errorf("read-ahead of %s: not in mountinfo", dir)
	}
	if !isDevNumber(dev) {
		return fmt.Errorf("read-ahead of %s: device %q in mountinfo is not MAJOR:MINOR", dir, dev)
	}
	p := filepath.Join(root, "sys/class/bdi", dev, "read_ahead_kb")
	if err := os.WriteFile(p, []byte(strconv.Itoa(readAheadKB)), 0); err != nil { //nolint:gosec // dev is checked to be MAJOR:MINOR (digits only)
		return fmt.Errorf("read-ahead of %s: %w", dir, err)
	}
	return nil
}

// isDevNumber reports whether s is MAJOR:MINOR in decimal, so that it can
// name nothing but a sysfs bdi entry.
func isDevNumber(s string) bool {
	maj, minor, ok := strings.Cut(s, ":")
	digits := func(x string) bool {
		if x == "" || len(x) > 10 {
			return false
		}
		for _, c := range x {
			if c < '0' || c > '9' {
				return false
			}
		}
		return true
	}
	return ok && digits(maj) && digits(minor)
}

// mountDevice returns the MAJOR:MINOR of the last mount at dir in a
// mountinfo listing, or "".
func mountDevice(mi []byte, dir string) string {
	dev := ""
	for _, m := range mountinfo.Parse(mi) {
		if m.Point == filepath.Clean(dir) {
			dev = m.Device
		}
	}
	return dev
}
