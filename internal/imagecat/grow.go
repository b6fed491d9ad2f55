package imagecat

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// Source is the model.Image Source of images pulled from the catalog.
const Source = "catalog"

// ErrShrink is returned by GrowExt4 for a size below the image's.
var ErrShrink = errors.New("a catalog image cannot be made smaller than its bundle's rootfs")

// GrowExt4 enlarges the unmounted ext4 image at path to newSize bytes (a
// multiple of 4 KiB, at least its current size): the file is extended
// sparse, checked with e2fsck -fp and grown with resize2fs.
func GrowExt4(ctx context.Context, path string, newSize int64) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("grow ext4: %w", err)
	}
	switch {
	case newSize < st.Size():
		return fmt.Errorf("grow ext4 %s to %d bytes: it has %d: %w", path, newSize, st.Size(), ErrShrink)
	case newSize == st.Size():
		return nil
	case newSize%extentBlock != 0 || newSize > maxRootFSBytes:
		return fmt.Errorf("grow ext4 %s: size %d is not a multiple of %d up to %d", path, newSize, extentBlock, maxRootFSBytes)
	}
	if err := os.Truncate(path, newSize); err != nil {
		return fmt.Errorf("grow ext4: %w", err)
	}
	for _, c := range [][]string{{"e2fsck", "-fp", path}, {"resize2fs", path}} {
		cmd := exec.CommandContext(ctx, c[0], c[1:]...) // #nosec G204 -- fixed programs; the path is the daemon's own staging file
		cmd.Env = append(os.Environ(), "LC_ALL=C")
		if out, err := cmd.CombinedOutput(); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("grow ext4: %w", ctx.Err())
			}
			return fmt.Errorf("grow ext4 %s: %s: %w: %s", path, c[0], err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}
