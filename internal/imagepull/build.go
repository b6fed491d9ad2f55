package imagepull

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/progress"
)

// Builder names how BuildImage turns the layers into an ext4.
type Builder string

// The builders.
const (
	// BuilderAuto is the direct builder, falling back to staging (with
	// the reason logged) when the direct builder cannot build the image.
	BuilderAuto Builder = ""
	// BuilderDirect writes the ext4 straight from the layers (Scan,
	// Tree.WriteExt4): no staging tree, no debugfs pass.
	BuilderDirect Builder = "direct"
	// BuilderStaging extracts into a staging tree and runs mkfs.ext4 -d
	// and the debugfs ownership pass (Flatten, BuildExt4,
	// ApplyOwnership).
	BuilderStaging Builder = "staging"
)

// ParseBuilder reads a --builder value: "", "auto", "direct" or "staging".
func ParseBuilder(s string) (Builder, error) {
	switch s {
	case "", "auto":
		return BuilderAuto, nil
	case string(BuilderDirect), string(BuilderStaging):
		return Builder(s), nil
	}
	return "", fmt.Errorf("builder %q: want auto, direct or staging", s)
}

// BuildOptions configure BuildImage.
type BuildOptions struct {
	Builder Builder
	// Size is the ext4 size; zero means DefaultSize of the content.
	Size int64
	// MaxBytes and MaxEntries bound the layers (see FlattenOptions).
	MaxBytes   int64
	MaxEntries int
	// ScratchDir is where the staging builder extracts (in a new
	// "rootfs" directory below it) and the direct builder lays out the
	// skeleton InspectTree reads. Required; it must be private to the
	// daemon (0700).
	ScratchDir string
	Progress   progress.Func
	// Log receives the reason for a fallback. Nil means slog.Default().
	Log *slog.Logger
}

// Built describes what BuildImage made.
type Built struct {
	Metadata Metadata
	Size     int64   // the ext4's size
	Builder  Builder // the builder that made it
	Fallback string  // why the direct builder was not used, when it was not
	// Facts are what InspectGuest found in the tree (init, sshd).
	Facts GuestFacts
}

// BuildImage writes src's final tree as an ext4 at ext4Path (which must
// not exist; nothing is left there on failure). Image content that either
// builder refuses (an *EntryError, ErrTooLarge, ErrSizeTooSmall, a corrupt
// blob) fails the call; the direct builder's own limits
// (ErrDirectUnsupported) make BuilderAuto retry with staging.
func BuildImage(ctx context.Context, src LayerSource, ext4Path string, opts BuildOptions) (Built, error) {
	if opts.ScratchDir == "" {
		return Built{}, errors.New("build image: no scratch dir")
	}
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	if opts.Builder == BuilderStaging {
		return buildStaging(ctx, src, ext4Path, opts)
	}
	b, err := buildDirect(ctx, src, ext4Path, opts)
	if err == nil || opts.Builder == BuilderDirect || !errors.Is(err, ErrDirectUnsupported) {
		return b, err
	}
	log.Warn("direct ext4 builder unavailable; falling back to the staging builder", "err", err)
	opts.Progress.Report(progress.Event{Phase: "mkfs", Message: "falling back to the staging builder: " + err.Error()})
	b, serr := buildStaging(ctx, src, ext4Path, opts)
	b.Fallback = err.Error()
	return b, serr
}

func buildDirect(ctx context.Context, src LayerSource, ext4Path string, opts BuildOptions) (Built, error) {
	tree, err := Scan(ctx, src, filepath.Dir(ext4Path), FlattenOptions{MaxBytes: opts.MaxBytes, MaxEntries: opts.MaxEntries, Progress: opts.Progress})
	if err != nil {
		return Built{}, err
	}
	defer tree.Close()
	md := tree.Metadata()
	size, err := sizeFor(md, opts.Size)
	if err != nil {
		return Built{}, err
	}
	skeleton := filepath.Join(opts.ScratchDir, "skeleton")
	if err := os.Mkdir(skeleton, 0o700); err != nil {
		return Built{}, fmt.Errorf("create inspection dir: %w", err)
	}
	facts, err := tree.InspectTree(skeleton)
	_ = os.Remove(skeleton)
	if err != nil {
		return Built{}, err
	}
	opts.Progress.Report(progress.Event{Phase: "mkfs", Message: fmt.Sprintf("%s of content into a %s ext4 (direct)", humanBytes(DiskUsage(md)), humanBytes(size))})
	if err := tree.WriteExt4(ctx, src, ext4Path, size); err != nil {
		return Built{}, err
	}
	opts.Progress.Report(progress.Event{Phase: "mkfs", Done: true})
	return Built{Metadata: md, Size: size, Builder: BuilderDirect, Facts: facts}, nil
}

func buildStaging(ctx context.Context, src LayerSource, ext4Path string, opts BuildOptions) (Built, error) {
	rootDir := filepath.Join(opts.ScratchDir, "rootfs")
	if err := os.Mkdir(rootDir, 0o700); err != nil {
		return Built{}, fmt.Errorf("create extraction dir: %w", err)
	}
	defer os.RemoveAll(rootDir)
	md, err := Flatten(ctx, src, rootDir, FlattenOptions{MaxBytes: opts.MaxBytes, MaxEntries: opts.MaxEntries, Progress: opts.Progress})
	if err != nil {
		return Built{}, err
	}
	facts := InspectGuest(rootDir)
	size, err := sizeFor(md, opts.Size)
	if err != nil {
		return Built{}, err
	}
	opts.Progress.Report(progress.Event{Phase: "mkfs", Message: fmt.Sprintf("%s of content into a %s ext4", humanBytes(DiskUsage(md)), humanBytes(size))})
	if err := BuildExt4(ctx, rootDir, ext4Path, size); err != nil {
		return Built{}, err
	}
	opts.Progress.Report(progress.Event{Phase: "mkfs", Done: true})
	// The extracted tree is no longer needed: free the disk space now.
	_ = os.RemoveAll(rootDir)
	opts.Progress.Report(progress.Event{Phase: "ownership", Current: int64(len(md)), Total: int64(len(md)), Unit: "files"})
	if err := ApplyOwnership(ctx, ext4Path, md); err != nil {
		_ = os.Remove(ext4Path)
		return Built{}, err
	}
	opts.Progress.Report(progress.Event{Phase: "ownership", Done: true})
	return Built{Metadata: md, Size: size, Builder: BuilderStaging, Facts: facts}, nil
}

// sizeFor is the ext4 size for md: size when given (checked), else
// DefaultSize.
func sizeFor(md Metadata, size int64) (int64, error) {
	content := DiskUsage(md)
	if size == 0 {
		return DefaultSize(content), nil
	}
	if err := CheckSize(content, size); err != nil {
		return 0, err
	}
	return size, nil
}
