// Package download fetches the files a catalog index names: the index
// itself, and artifacts (image bundles, kernels, initrds, module tarballs)
// given by URL, size and sha256. It is shared by internal/imagecat and
// internal/kernels/kernelcat.
//
// An artifact download is resumable and verified:
//
//	<final>            the verified file, published by one rename
//	<final>.partial    the bytes received so far (mode 0600)
//	<final>.lock       flock'ed while a download of <final> runs
//
// While downloading, the bytes go to <final>.partial. An interrupted
// download (a dropped connection, a cancelled pull, a crash) leaves that
// file behind, and the next attempt asks only for the rest with an HTTP
// Range request; a server that answers 200 instead of 206 makes it start
// over. The whole file is hashed before it is renamed to its final name: a
// size or sha256 mismatch deletes it and returns ErrChecksum, so nothing
// that did not verify is ever published. Concurrent downloads of one file
// (in this process or another) are serialised by the lock file; a wait for
// it honours cancellation.
package download

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/progress"
)

// Errors the package wraps.
var (
	// ErrChecksum: the downloaded bytes do not have the size or sha256
	// the index gives. Nothing was published; the partial file is gone.
	ErrChecksum = errors.New("download does not match the catalog's sha256")
	// ErrBadScheme: a URL is not http, https or file, or an index links
	// from one family to the other.
	ErrBadScheme = errors.New("unsupported catalog URL scheme (want http, https or file)")
	// ErrTooLarge: an index is larger than the caller's limit.
	ErrTooLarge = errors.New("index larger than the limit")
	// ErrBadFile: a File has no valid sha256 or size.
	ErrBadFile = errors.New("invalid download: sha256 must be 64 lowercase hex digits and size positive")
)

// Attempts is how often one download is tried within one Fetch, each
// attempt resuming where the previous one stopped.
const Attempts = 3

// File is one artifact an index names.
type File struct {
	URL    string
	SHA256 string // 64 lowercase hex digits
	Size   int64  // bytes, > 0
}

// Options configure Fetch.
type Options struct {
	// Mode is the published file's mode; zero means 0600.
	Mode fs.FileMode
	// Item names the artifact in progress events ("bundle", "kernel" ...).
	Item string
	// Progress receives "download" events.
	Progress progress.Func
}

// httpClient is used for every request. It has no overall timeout
// (downloads are large); contexts bound requests, and a server that sends
// no headers for 30 s fails.
var httpClient = &http.Client{
	Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		ResponseHeaderTimeout: 30 * time.Second,
		IdleConnTimeout:       30 * time.Second,
	},
}

// Fetch downloads f to final unless a verified copy is there already (see
// the package doc). final's directory must exist.
func Fetch(ctx context.Context, f File, final string, opts Options) error {
	if !isHex64(f.SHA256) || f.Size <= 0 {
		return fmt.Errorf("download %s: sha256 %q, size %d: %w", opts.Item, f.SHA256, f.Size, ErrBadFile)
	}
	u, err := url.Parse(f.URL)
	if err != nil || Family(u.Scheme) == "" {
		return fmt.Errorf("download %s: url %q: %w", opts.Item, f.URL, ErrBadScheme)
	}
	if opts.Mode == 0 {
		opts.Mode = 0o600
	}
	pf := opts.Progress
	unlock, err := lockFile(ctx, final+".lock")
	if err != nil {
		return err
	}
	defer unlock()

	if st, err := os.Stat(final); err == nil && st.Mode().IsRegular() && st.Size() == f.Size {
		if sum, err := hashFile(ctx, final); err == nil && sum == f.SHA256 {
			pf.Report(progress.Event{Phase: "download", Item: opts.Item, Current: f.Size, Total: f.Size, Unit: "bytes", Done: true, Message: "cached"})
			return nil
		}
	}
	_ = os.Remove(final)

	partial := final + ".partial"
	var lastErr error
	for attempt := 1; attempt <= Attempts; attempt++ {
		lastErr = fetchOnce(ctx, u, f, partial, opts)
		if lastErr == nil || errors.Is(lastErr, ErrChecksum) || ctx.Err() != nil {
			break
		}
		var se *StatusError
		if errors.As(lastErr, &se) && se.Code < 500 && se.Code != http.StatusRequestedRangeNotSatisfiable {
			break
		}
		if attempt < Attempts {
			pf.Report(progress.Event{Phase: "download", Item: opts.Item, Message: fmt.Sprintf("attempt %d failed, resuming: %v", attempt, lastErr)})
			select {
			case <-ctx.Done():
			case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
			}
		}
	}
	if ctx.Err() != nil {
		return fmt.Errorf("download %s: %w", u.Redacted(), ctx.Err())
	}
	if lastErr != nil {
		return lastErr
	}
	pf.Report(progress.Event{Phase: "verify", Item: opts.Item, Message: "sha256"})
	sum, err := hashFile(ctx, partial)
	if err != nil {
		return err
	}
	if sum != f.SHA256 {
		_ = os.Remove(partial)
		return fmt.Errorf("%s %s: got sha256 %s, the catalog says %s (the download was deleted; pull again, and if it repeats the catalog is stale or tampered with): %w",
			opts.Item, u.Redacted(), sum, f.SHA256, ErrChecksum)
	}
	if err := os.Chmod(partial, opts.Mode); err != nil {
		return fmt.Errorf("download %s: %w", opts.Item, err)
	}
	if err := os.Rename(partial, final); err != nil {
		return fmt.Errorf("download %s: %w", opts.Item, err)
	}
	if err := syncDir(filepath.Dir(final)); err != nil {
		return err
	}
	pf.Report(progress.Event{Phase: "download", Item: opts.Item, Current: f.Size, Total: f.Size, Unit: "bytes", Done: true})
	return nil
}

// fetchOnce appends to partial from where it ends (restarting when the
// server ignores the Range request) until it holds f.Size bytes.
func fetchOnce(ctx context.Context, u *url.URL, f File, partial string, opts Options) error {
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
	o, err := Open(ctx, u, offset)
	var se *StatusError
	if errors.As(err, &se) && se.Code == http.StatusRequestedRangeNotSatisfiable && offset > 0 {
		// The server will not serve the rest: start over.
		_ = os.Remove(partial)
		offset = 0
		o, err = Open(ctx, u, 0)
	}
	if err != nil {
		return err
	}
	defer o.Body.Close()
	flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
	if !o.Resumed {
		offset = 0
		flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	}
	out, err := os.OpenFile(partial, flags|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("download %s: %w", opts.Item, err)
	}
	if offset > 0 {
		opts.Progress.Report(progress.Event{Phase: "download", Item: opts.Item, Current: offset, Total: f.Size, Unit: "bytes", Message: fmt.Sprintf("resuming at byte %d", offset)})
	}
	pw := &progressWriter{w: out, pf: opts.Progress, item: opts.Item, done: offset, total: f.Size}
	n, err := io.Copy(pw, &ctxReader{ctx: ctx, r: io.LimitReader(o.Body, f.Size-offset+1)})
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
		return fmt.Errorf("%s %s: more than the %d bytes the catalog says: %w", opts.Item, u.Redacted(), f.Size, ErrChecksum)
	case got < f.Size:
		return fmt.Errorf("download %s: connection ended after %d of %d bytes: %w", u.Redacted(), got, f.Size, io.ErrUnexpectedEOF)
	}
	return nil
}

// Index reads the index at indexURL (http://, https:// or file://), at
// most maxBytes of it, and returns its bytes and parsed URL (the base its
// relative links resolve against, see Resolve).
func Index(ctx context.Context, indexURL string, maxBytes int64) ([]byte, *url.URL, error) {
	base, err := url.Parse(indexURL)
	if err != nil {
		return nil, nil, fmt.Errorf("catalog %q: %w", indexURL, err)
	}
	o, err := Open(ctx, base, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("catalog %s: fetch: %w", base.Redacted(), err)
	}
	defer o.Body.Close()
	data, err := io.ReadAll(io.LimitReader(o.Body, maxBytes+1))
	if err != nil {
		return nil, nil, fmt.Errorf("catalog %s: fetch: %w", base.Redacted(), err)
	}
	if int64(len(data)) > maxBytes {
		return nil, nil, fmt.Errorf("catalog %s: more than %d bytes: %w", base.Redacted(), maxBytes, ErrTooLarge)
	}
	return data, base, nil
}

// Resolve makes ref (an index's link, absolute or relative) absolute
// against base, the index's URL. A link that leaves the index's scheme
// family (http/https, or file) is refused: an http index must not point at
// host files.
func Resolve(base *url.URL, ref string) (string, error) {
	u, err := url.Parse(ref)
	if err != nil {
		return "", fmt.Errorf("url %q: %w", ref, err)
	}
	abs := base.ResolveReference(u)
	if Family(abs.Scheme) == "" || Family(abs.Scheme) != Family(base.Scheme) {
		return "", fmt.Errorf("url %q from a %s index: %w", abs.Redacted(), base.Scheme, ErrBadScheme)
	}
	return abs.String(), nil
}

// Family is "http" for http and https, "file" for file, "" otherwise.
func Family(scheme string) string {
	switch scheme {
	case "http", "https":
		return "http"
	case "file":
		return "file"
	}
	return ""
}

// Opened is a response body and what the server did with a Range request.
type Opened struct {
	Body    io.ReadCloser
	Resumed bool // the body starts at the requested offset
}

// StatusError is an HTTP answer other than 200 or 206.
type StatusError struct {
	URL  string
	Code int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("GET %s: %d %s", e.URL, e.Code, http.StatusText(e.Code))
}

// Open starts reading u from offset (0: from the start). For http(s) a
// server that ignores the Range header gives Resumed=false and the whole
// body; file:// always honours the offset.
func Open(ctx context.Context, u *url.URL, offset int64) (Opened, error) {
	switch Family(u.Scheme) {
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return Opened{}, fmt.Errorf("file URL %q names a host: %w", u.String(), ErrBadScheme)
		}
		f, err := os.Open(u.Path) // #nosec G304 G703 -- file:// URLs only come from a file:// index the operator configured
		if err != nil {
			return Opened{}, err
		}
		if offset > 0 {
			if _, err := f.Seek(offset, io.SeekStart); err != nil {
				_ = f.Close()
				return Opened{}, err
			}
		}
		return Opened{Body: f, Resumed: offset > 0}, nil
	case "http":
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			return Opened{}, err
		}
		if offset > 0 {
			req.Header.Set("Range", fmt.Sprintf("bytes=%d-", offset))
		}
		resp, err := httpClient.Do(req) // #nosec G107 -- the URL comes from the configured catalog
		if err != nil {
			return Opened{}, err
		}
		switch {
		case resp.StatusCode == http.StatusOK:
			return Opened{Body: resp.Body}, nil
		case resp.StatusCode == http.StatusPartialContent && offset > 0:
			var start int64
			if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-", &start); err != nil || start != offset {
				_ = resp.Body.Close()
				return Opened{}, fmt.Errorf("GET %s: Content-Range %q does not start at %d", u.Redacted(), resp.Header.Get("Content-Range"), offset)
			}
			return Opened{Body: resp.Body, Resumed: true}, nil
		default:
			_ = resp.Body.Close()
			return Opened{}, &StatusError{URL: u.Redacted(), Code: resp.StatusCode}
		}
	}
	return Opened{}, fmt.Errorf("%q: %w", u.Redacted(), ErrBadScheme)
}

// HashFile returns the size and hex sha256 of the file at p, as an index
// records them.
func HashFile(ctx context.Context, p string) (size int64, sum string, err error) {
	st, err := os.Stat(p)
	if err != nil {
		return 0, "", err
	}
	sum, err = hashFile(ctx, p)
	return st.Size(), sum, err
}

func hashFile(ctx context.Context, p string) (string, error) {
	f, err := os.Open(p) // #nosec G304 -- a path the caller owns
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

func isHex64(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// lockWait is how often a waiting lockFile retries.
const lockWait = 50 * time.Millisecond

// lockFile takes an exclusive flock on p, serialising concurrent downloads
// of one file. It waits until the lock is free or ctx is done.
func lockFile(ctx context.Context, p string) (func(), error) {
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR|unix.O_NOFOLLOW, 0o600) // #nosec G304 -- a path the caller owns
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			_ = f.Close()
			return nil, fmt.Errorf("lock %s: %w", p, err)
		}
		select {
		case <-ctx.Done():
			_ = f.Close()
			return nil, fmt.Errorf("wait for another download of %s: %w", filepath.Base(p), ctx.Err())
		case <-time.After(lockWait):
		}
	}
	return func() {
		_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
		_ = f.Close()
	}, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir) // #nosec G304 -- a path the caller owns
	if err != nil {
		return fmt.Errorf("open %s for fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// progressWriter reports "download" events at most every 200 ms.
type progressWriter struct {
	w           io.Writer
	pf          progress.Func
	item        string
	done, total int64
	last        time.Time
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.done += int64(n)
	if p.pf != nil && time.Since(p.last) > 200*time.Millisecond {
		p.last = time.Now()
		p.pf(progress.Event{Phase: "download", Item: p.item, Current: p.done, Total: p.total, Unit: "bytes"})
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
