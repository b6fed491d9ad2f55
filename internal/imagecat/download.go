package imagecat

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/progress"
)

// downloadAttempts is how often one bundle download is tried within one
// Download call, each attempt resuming where the previous one stopped.
const downloadAttempts = 3

// Download fetches the bundle f into cacheDir and returns the path of the
// verified copy, <cacheDir>/<sha256>.bundle. While downloading, the bytes
// go to <sha256>.partial; an interrupted download (a dropped connection,
// a cancelled pull, a crash) leaves that file behind and the next attempt
// asks only for the rest with an HTTP Range request (a server that answers
// 200 instead of 206 makes it start over). The whole file is hashed before
// it is renamed to its final name: a size or sha256 mismatch deletes it and
// returns ErrChecksum, so nothing that did not verify is ever read by
// Unpack. Concurrent downloads of one bundle are serialised with a lock
// file. "download" events go to pf.
func Download(ctx context.Context, f File, cacheDir string, pf progress.Func) (string, error) {
	if !sha256RE.MatchString(f.SHA256) || f.Size <= 0 || f.Size > maxBundleBytes {
		return "", fmt.Errorf("download bundle: sha256 %q, size %d: %w", f.SHA256, f.Size, ErrBadIndex)
	}
	u, err := url.Parse(f.URL)
	if err != nil || family(u.Scheme) == "" {
		return "", fmt.Errorf("download bundle: url %q: %w", f.URL, ErrBadScheme)
	}
	if err := os.MkdirAll(cacheDir, 0o700); err != nil {
		return "", fmt.Errorf("download bundle: cache dir: %w", err)
	}
	final := filepath.Join(cacheDir, f.SHA256+".bundle")
	partial := filepath.Join(cacheDir, f.SHA256+".partial")
	unlock, err := lockFile(filepath.Join(cacheDir, f.SHA256+".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()

	if st, err := os.Stat(final); err == nil && st.Mode().IsRegular() && st.Size() == f.Size {
		if sum, err := hashFile(ctx, final); err == nil && sum == f.SHA256 {
			pf.Report(progress.Event{Phase: "download", Item: "bundle", Current: f.Size, Total: f.Size, Unit: "bytes", Done: true, Message: "cached"})
			return final, nil
		}
	}
	_ = os.Remove(final)

	var lastErr error
	for attempt := 1; attempt <= downloadAttempts; attempt++ {
		lastErr = fetchOnce(ctx, u, f, partial, pf)
		if lastErr == nil || errors.Is(lastErr, ErrChecksum) || ctx.Err() != nil {
			break
		}
		var se *statusError
		if errors.As(lastErr, &se) && se.code < 500 && se.code != 416 {
			break
		}
		if attempt < downloadAttempts {
			pf.Report(progress.Event{Phase: "download", Item: "bundle", Message: fmt.Sprintf("attempt %d failed, resuming: %v", attempt, lastErr)})
			select {
			case <-ctx.Done():
			case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
			}
		}
	}
	if ctx.Err() != nil {
		return "", fmt.Errorf("download %s: %w", u.Redacted(), ctx.Err())
	}
	if lastErr != nil {
		return "", lastErr
	}
	pf.Report(progress.Event{Phase: "verify", Item: "bundle", Message: "sha256"})
	sum, err := hashFile(ctx, partial)
	if err != nil {
		return "", err
	}
	if sum != f.SHA256 {
		_ = os.Remove(partial)
		return "", fmt.Errorf("bundle %s: got sha256 %s, the catalog says %s (the download was deleted; pull again, and if it repeats the catalog is stale or tampered with): %w",
			u.Redacted(), sum, f.SHA256, ErrChecksum)
	}
	if err := os.Rename(partial, final); err != nil {
		return "", fmt.Errorf("download bundle: %w", err)
	}
	pf.Report(progress.Event{Phase: "download", Item: "bundle", Current: f.Size, Total: f.Size, Unit: "bytes", Done: true})
	return final, nil
}

// fetchOnce appends to partial from where it ends (restarting when the
// server ignores the Range request) until it holds f.Size bytes.
func fetchOnce(ctx context.Context, u *url.URL, f File, partial string, pf progress.Func) error {
	var offset int64
	if st, err := os.Stat(partial); err == nil {
		offset = st.Size()
	}
	if offset > f.Size {
		_ = os.Remove(partial)
		offset = 0
	}
	if offset == f.Size {
		return nil
	}
	o, err := open(ctx, u, offset)
	var se *statusError
	if errors.As(err, &se) && se.code == 416 && offset > 0 {
		// The server will not serve the rest: start over.
		_ = os.Remove(partial)
		offset = 0
		o, err = open(ctx, u, 0)
	}
	if err != nil {
		return err
	}
	defer o.body.Close()
	flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
	if !o.resumed {
		offset = 0
		flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	}
	out, err := os.OpenFile(partial, flags, 0o600)
	if err != nil {
		return fmt.Errorf("download bundle: %w", err)
	}
	if offset > 0 {
		pf.Report(progress.Event{Phase: "download", Item: "bundle", Current: offset, Total: f.Size, Unit: "bytes", Message: fmt.Sprintf("resuming at byte %d", offset)})
	}
	pw := &progressWriter{w: out, pf: pf, done: offset, total: f.Size}
	n, err := io.Copy(pw, &ctxReader{ctx: ctx, r: io.LimitReader(o.body, f.Size-offset+1)})
	if serr := out.Sync(); err == nil {
		err = serr
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("download %s after %d bytes: %w", u.Redacted(), offset+n, err)
	}
	switch got := offset + n; {
	case got > f.Size:
		_ = os.Remove(partial)
		return fmt.Errorf("bundle %s: more than the %d bytes the catalog says: %w", u.Redacted(), f.Size, ErrChecksum)
	case got < f.Size:
		return fmt.Errorf("download %s: connection ended after %d of %d bytes: %w", u.Redacted(), got, f.Size, io.ErrUnexpectedEOF)
	}
	return nil
}

// progressWriter reports "download" events at most every 200 ms.
type progressWriter struct {
	w           io.Writer
	pf          progress.Func
	done, total int64
	last        time.Time
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.done += int64(n)
	if p.pf != nil && time.Since(p.last) > 200*time.Millisecond {
		p.last = time.Now()
		p.pf(progress.Event{Phase: "download", Item: "bundle", Current: p.done, Total: p.total, Unit: "bytes"})
	}
	return n, err
}

// ctxReader stops a copy when ctx ends (file:// bodies ignore contexts).
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

// hashFile returns the hex sha256 of the file at p.
func hashFile(ctx context.Context, p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, &ctxReader{ctx: ctx, r: f}); err != nil {
		return "", fmt.Errorf("hash %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// HashFile returns the size and hex sha256 of the file at p, as an index
// entry's bundle records them.
func HashFile(ctx context.Context, p string) (size int64, sum string, err error) {
	st, err := os.Stat(p)
	if err != nil {
		return 0, "", err
	}
	sum, err = hashFile(ctx, p)
	return st.Size(), sum, err
}

// lockFile takes an exclusive flock on p, serialising concurrent downloads
// of one bundle.
func lockFile(p string) (func(), error) {
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		_ = f.Close()
	}, nil
}
