package imagecat

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/download"
	"github.com/bangerdev/banger/internal/progress"
)

// Download fetches the bundle f into cacheDir and returns the path of the
// verified copy, <cacheDir>/<sha256>.bundle. It is download.Fetch: resumed
// from <sha256>.bundle.partial with an HTTP Range request after an
// interruption, hashed before the rename, serialised by
// <sha256>.bundle.lock; a size or sha256 mismatch deletes the download and
// returns ErrChecksum, so nothing that did not verify is ever read by
// Unpack. "download" events go to pf.
func Download(ctx context.Context, f File, cacheDir string, pf progress.Func) (string, error) {
	if !sha256RE.MatchString(f.SHA256) || f.Size <= 0 || f.Size > maxBundleBytes {
		return "", fmt.Errorf("download bundle: sha256 %q, size %d: %w", f.SHA256, f.Size, ErrBadIndex)
	}
	if err := os.MkdirAll(cacheDir, 0o700); err != nil {
		return "", fmt.Errorf("download bundle: cache dir: %w", err)
	}
	final := filepath.Join(cacheDir, f.SHA256+".bundle")
	err := download.Fetch(ctx, download.File{URL: f.URL, SHA256: f.SHA256, Size: f.Size}, final,
		download.Options{Mode: 0o600, Item: "bundle", Progress: pf})
	if err != nil {
		return "", err
	}
	return final, nil
}

// HashFile returns the size and hex sha256 of the file at p, as an index
// entry's bundle records them.
func HashFile(ctx context.Context, p string) (size int64, sum string, err error) {
	return download.HashFile(ctx, p)
}

// ctxReader stops a copy when ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
