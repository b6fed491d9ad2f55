package imagepull

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/progress"
)

// ErrDigestMismatch is wrapped when a blob's content does not hash to its
// digest, whether it came from the registry or from the cache.
var ErrDigestMismatch = errors.New("blob digest mismatch")

// ErrStalled is wrapped when a registry stops sending data for longer than
// the pull's stall timeout (PullOptions.StallTimeout).
var ErrStalled = errors.New("registry stalled")

// ErrInvalidDigest is wrapped when a digest is not "sha256:" followed by 64
// lowercase hex digits.
var ErrInvalidDigest = errors.New("invalid blob digest")

// Cache is the on-disk layer blob cache shared by all pulls.
//
// Layout, under Dir (banger's cache directory, e.g. /var/cache/banger):
//
//	<Dir>/oci/blobs/sha256/<hex>            a compressed layer blob, named by its sha256
//	<Dir>/oci/blobs/sha256/.tmp-<hex>-<rnd> a download in progress (flock'ed by its writer)
//
// Blobs are filled lazily: OpenBlob downloads a missing blob into a temp file
// in the same directory, checks its sha256 against the digest, fsyncs it,
// renames it into place atomically and fsyncs the directory. A blob file
// therefore only ever appears under its final name with the right content.
//
// Blobs already present are re-verified every time they are read: the
// reader OpenBlob returns hashes the bytes as the caller consumes them and
// fails at end of file (and on Close) when they do not match, and deletes
// the bad blob so the next pull downloads it again. Hashing the bytes that
// are decompressed anyway costs no extra I/O, and it catches corruption
// that happened after the download (disk errors, a tampered cache), which
// "verified once" would not.
//
// Concurrent pulls never wait for each other: each downloads a missing blob
// to a temp file of its own and the last rename wins with identical
// content. So a slow or stalled registry of one user's pull cannot hold up
// another user's pull of the same layer. (Within one pull, the prefetch
// and the read of a layer share one download: see Image.)
type Cache struct {
	Dir string
}

// blobDir is the directory holding the sha256 blobs.
func (c *Cache) blobDir() (string, error) {
	if c == nil || c.Dir == "" {
		return "", errors.New("layer cache directory is not configured")
	}
	return filepath.Join(c.Dir, "oci", "blobs", "sha256"), nil
}

// BlobPath returns the path of the blob with the given digest
// ("sha256:<hex>"), whether or not it is present.
func (c *Cache) BlobPath(digest string) (string, error) {
	hexDigest, err := digestHex(digest)
	if err != nil {
		return "", err
	}
	dir, err := c.blobDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, hexDigest), nil
}

// digestHex checks digest and returns its hex part.
func digestHex(digest string) (string, error) {
	h, ok := strings.CutPrefix(digest, "sha256:")
	if !ok || !isHex64(h) {
		return "", fmt.Errorf("%w: %q", ErrInvalidDigest, digest)
	}
	return h, nil
}

func isHex64(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// FetchFunc opens the compressed content of a blob at its source.
type FetchFunc func(ctx context.Context) (io.ReadCloser, error)

// OpenBlob returns a reader of the blob with the given digest and size
// (size <= 0 when unknown), downloading it with fetch first when it is not
// in the cache. Download progress goes to report as "download" events for
// the digest, in bytes. The reader verifies a cached blob as it is read (see
// Cache); Close reads what the caller left unread and returns
// ErrDigestMismatch when the content is wrong.
func (c *Cache) OpenBlob(ctx context.Context, digest string, size int64, fetch FetchFunc, report progress.Func) (io.ReadCloser, error) {
	path, err := c.BlobPath(digest)
	if err != nil {
		return nil, err
	}
	if f, err := os.Open(path); err == nil {
		report.Report(progress.Event{Phase: "download", Item: digest, Current: size, Total: max(size, 0), Message: "cached", Done: true})
		return &verifyingReader{f: f, path: path, digest: digest, want: path[len(path)-64:], h: sha256.New()}, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open cached blob %s: %w", digest, err)
	}
	f, err := c.download(ctx, digest, size, fetch, report)
	if err != nil {
		return nil, err
	}
	return f, nil
}

// Ensure downloads the blob into the cache unless it is there already. It
// does not verify a blob that is present: OpenBlob does that as it reads.
func (c *Cache) Ensure(ctx context.Context, digest string, size int64, fetch FetchFunc, report progress.Func) error {
	path, err := c.BlobPath(digest)
	if err != nil {
		return err
	}
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	f, err := c.download(ctx, digest, size, fetch, report)
	if err != nil {
		return err
	}
	return f.Close()
}

// flights serializes work on one key (a layer digest) within one pull, so
// that the prefetch of a layer and its read share one download. Waits
// honour cancellation.
type flights struct {
	mu sync.Mutex
	m  map[string]chan struct{}
}

// lock waits until no other holder has key, or ctx is done, and returns
// the function that releases it.
func (f *flights) lock(ctx context.Context, key string) (func(), error) {
	for {
		f.mu.Lock()
		if f.m == nil {
			f.m = map[string]chan struct{}{}
		}
		busy, ok := f.m[key]
		if !ok {
			done := make(chan struct{})
			f.m[key] = done
			f.mu.Unlock()
			return func() {
				f.mu.Lock()
				delete(f.m, key)
				f.mu.Unlock()
				close(done)
			}, nil
		}
		f.mu.Unlock()
		select {
		case <-busy:
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for the download of %s: %w", key, ctx.Err())
		}
	}
}

// download fetches a blob into a flock'ed temp file, verifies it, fsyncs it
// and renames it into place. It returns the file positioned at its start.
func (c *Cache) download(ctx context.Context, digest string, size int64, fetch FetchFunc, report progress.Func) (*os.File, error) {
	dir, err := c.blobDir()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create layer cache %s: %w", dir, err)
	}
	hexDigest := digest[len("sha256:"):]
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("random temp name: %w", err)
	}
	tmp := filepath.Join(dir, ".tmp-"+hexDigest+"-"+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create download file for %s: %w", digest, err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	// The lock tells Prune that this temp file is live.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		return nil, fmt.Errorf("lock download file for %s: %w", digest, err)
	}

	rc, err := fetch(ctx)
	if err != nil {
		return nil, fmt.Errorf("fetch blob %s: %w", digest, err)
	}
	defer rc.Close()
	h := sha256.New()
	pw := &progressWriter{report: report, digest: digest, total: max(size, 0)}
	var src io.Reader = rc
	if size > 0 {
		src = io.LimitReader(rc, size+1) // one byte more shows an over-long blob
	}
	n, err := io.Copy(io.MultiWriter(f, h, pw), &ctxReader{ctx: ctx, r: src})
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, fmt.Errorf("download blob %s: the registry sent nothing for too long after %d bytes (check the registry or the network, then pull again): %w: %w", digest, n, ErrStalled, err)
		}
		return nil, fmt.Errorf("download blob %s: %w", digest, err)
	}
	if size > 0 && n != size {
		return nil, fmt.Errorf("download blob %s: got %d bytes, the manifest says %d: %w", digest, n, size, ErrDigestMismatch)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != hexDigest {
		return nil, fmt.Errorf("download blob %s: content hashes to sha256:%s: %w", digest, got, ErrDigestMismatch)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("fsync blob %s: %w", digest, err)
	}
	final := filepath.Join(dir, hexDigest)
	if err := os.Rename(tmp, final); err != nil {
		return nil, fmt.Errorf("publish blob %s: %w", digest, err)
	}
	if err := syncDir(dir); err != nil {
		return nil, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("rewind blob %s: %w", digest, err)
	}
	report.Report(progress.Event{Phase: "download", Item: digest, Current: n, Total: n, Unit: "bytes", Done: true})
	ok = true
	return f, nil
}

// syncDir fsyncs a directory so that a rename in it is durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open %s for fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// Prune removes every blob whose digest ("sha256:<hex>") is not in keep, and
// temp files that no download holds any more (left by a crash). Blobs that
// a pull is reading stay readable to it (it holds them open). The caller
// must put the layers of pulls in progress into keep, or they will be
// downloaded again. It reports how many blobs it removed and the bytes freed
// (temp files included).
func (c *Cache) Prune(ctx context.Context, keep map[string]bool) (removedBlobs int, freedBytes int64, err error) {
	dir, err := c.blobDir()
	if err != nil {
		return 0, 0, err
	}
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("list layer cache %s: %w", dir, err)
	}
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return removedBlobs, freedBytes, err
		}
		name := e.Name()
		path := filepath.Join(dir, name)
		switch {
		case isHex64(name) && e.Type().IsRegular():
			if keep["sha256:"+name] {
				continue
			}
			info, err := e.Info()
			if err != nil {
				continue // removed meanwhile
			}
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				return removedBlobs, freedBytes, fmt.Errorf("remove blob %s: %w", path, err)
			}
			removedBlobs++
			freedBytes += info.Size()
		case strings.HasPrefix(name, ".tmp-") && e.Type().IsRegular():
			n, err := removeStaleTemp(path)
			if err != nil {
				return removedBlobs, freedBytes, err
			}
			freedBytes += n
		}
	}
	return removedBlobs, freedBytes, nil
}

// removeStaleTemp removes a download temp file unless a download holds its
// lock, and returns its size when it removed it.
func removeStaleTemp(path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return 0, nil //nolint:nilerr // gone, or renamed into place meanwhile
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return 0, nil //nolint:nilerr // a download holds it
	}
	info, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	// The file may have been renamed into place between open and lock: only
	// remove the name if it still refers to the file we locked.
	cur, err := os.Lstat(path)
	if err != nil || !os.SameFile(cur, info) {
		return 0, nil //nolint:nilerr // renamed into place meanwhile
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("remove stale download %s: %w", path, err)
	}
	return info.Size(), nil
}

// verifyingReader reads a cached blob and checks its sha256 at end of file.
type verifyingReader struct {
	f      *os.File
	path   string
	digest string
	want   string
	h      hash.Hash
	done   bool
	err    error
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.f.Read(p)
	v.h.Write(p[:n])
	if errors.Is(err, io.EOF) && !v.done {
		v.done = true
		if got := hex.EncodeToString(v.h.Sum(nil)); got != v.want {
			// The cache is corrupt: drop the blob so the next pull fetches it.
			_ = os.Remove(v.path)
			v.err = fmt.Errorf("cached blob %s hashes to sha256:%s (removed it; pull again): %w", v.digest, got, ErrDigestMismatch)
			return n, v.err
		}
	}
	return n, err
}

// Close reads the rest of the blob to finish its verification, then closes
// it.
func (v *verifyingReader) Close() error {
	_, err := io.Copy(io.Discard, v)
	if cerr := v.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close blob %s: %w", v.digest, cerr)
	}
	return err
}

// progressWriter reports download progress at most every 250 ms.
type progressWriter struct {
	report progress.Func
	digest string
	total  int64
	n      int64
	last   time.Time
}

func (p *progressWriter) Write(b []byte) (int, error) {
	p.n += int64(len(b))
	if p.report != nil && time.Since(p.last) > 250*time.Millisecond {
		p.last = time.Now()
		p.report(progress.Event{Phase: "download", Item: p.digest, Current: p.n, Total: p.total, Unit: "bytes"})
	}
	return len(b), nil
}

// ctxReader stops reading once ctx is done.
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
