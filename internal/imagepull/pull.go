package imagepull

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/progress"
)

// ErrPlatformNotFound is wrapped when an image has no linux/amd64 variant.
var ErrPlatformNotFound = errors.New("image has no linux/amd64 variant")

// ErrNotAnImage is wrapped when a reference names an artifact that is not a
// container image (unknown config or layer media type).
var ErrNotAnImage = errors.New("not a container image")

// Platform is the only platform banger pulls: its kernels are x86_64.
var Platform = v1.Platform{OS: "linux", Architecture: "amd64"}

// PullOptions configure Pull.
type PullOptions struct {
	// Cache holds the layer blobs. Required.
	Cache *Cache
	// Keychain finds registry credentials. Nil means authn.DefaultKeychain;
	// the daemon passes UserKeychain(home of the calling user).
	Keychain authn.Keychain
	// Progress receives "resolve" and per-layer "download" events.
	Progress progress.Func
	// Transport overrides the HTTP transport (tests). Nil means
	// remote.DefaultTransport with a read deadline of StallTimeout on
	// every connection.
	Transport http.RoundTripper
	// StallTimeout is how long a registry may send nothing, mid-request
	// or mid-blob, before the pull fails with ErrStalled. Zero means
	// DefaultStallTimeout.
	StallTimeout time.Duration
	// MaxBytes caps the compressed layer sizes the manifest declares,
	// summed over the image (a download never reads more than the
	// declared size). Zero means the free space of the cache's file
	// system minus FreeSpaceReserve.
	MaxBytes int64
}

// DefaultStallTimeout is PullOptions.StallTimeout's default.
const DefaultStallTimeout = 60 * time.Second

// MaxConfigBytes is the largest image config a pull reads (they are a few
// KiB; Docker's own limit for a config is 8 MiB too).
const MaxConfigBytes = 8 << 20

// Layer describes one layer blob of an image.
type Layer struct {
	Digest    string `json:"digest"`     // "sha256:<hex>" of the compressed blob
	Size      int64  `json:"size"`       // compressed size in bytes
	MediaType string `json:"media_type"` // e.g. application/vnd.oci.image.layer.v1.tar+gzip
}

// Image is a resolved linux/amd64 image whose layers can be read through the
// cache. It is a LayerSource for Flatten.
type Image struct {
	// Ref is the reference as parsed, e.g. "index.docker.io/library/debian:bookworm".
	Ref string
	// Digest is the digest of the linux/amd64 image manifest that was pulled.
	Digest string
	// IndexDigest is the digest of the index Ref resolved to, when it was
	// an index (multi-platform image); empty otherwise.
	IndexDigest string
	// Config is the image's run configuration (see runconfig.go).
	Config guestabi.ImageConfig

	layers   []Layer
	remote   []v1.Layer
	cache    *Cache
	progress progress.Func
	maxBytes int64   // cap on the declared layer sizes, summed
	flights  flights // one download per layer within this pull
}

// Layers returns the image's layers, oldest (base) first.
func (im *Image) Layers() []Layer { return slices.Clone(im.layers) }

// LayerDigests returns the digests of the image's layers, oldest first, as
// recorded in model.Image.Layers for cache pruning.
func (im *Image) LayerDigests() []string {
	out := make([]string, len(im.layers))
	for i, l := range im.layers {
		out[i] = l.Digest
	}
	return out
}

// Pull resolves ref (an OCI reference, see ParseReference) to its linux/amd64
// image manifest and returns the image. It fetches manifests and the config
// only; layer blobs are downloaded into opts.Cache lazily, when OpenLayer
// (that is, Flatten) first reads them.
func Pull(ctx context.Context, ref string, opts PullOptions) (*Image, error) {
	if opts.Cache == nil {
		return nil, errors.New("pull: no layer cache configured")
	}
	r, err := ParseReference(ref)
	if err != nil {
		return nil, err
	}
	kc := opts.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	ropts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(kc),
		remote.WithPlatform(Platform),
		remote.WithUserAgent("banger"),
	}
	stall := opts.StallTimeout
	if stall <= 0 {
		stall = DefaultStallTimeout
	}
	switch t, ok := remote.DefaultTransport.(*http.Transport); {
	case opts.Transport != nil:
		ropts = append(ropts, remote.WithTransport(opts.Transport))
	case ok:
		ropts = append(ropts, remote.WithTransport(deadlineTransport(t, stall)))
	}
	maxBytes := opts.MaxBytes
	if maxBytes <= 0 {
		if maxBytes, err = Budget(existingParent(opts.Cache.Dir), 0); err != nil {
			return nil, fmt.Errorf("pull %s: layer cache: %w", r, err)
		}
	}
	opts.Progress.Report(progress.Event{Phase: "resolve", Item: r.String()})

	desc, err := remote.Get(r, ropts...)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", r, err)
	}
	im := &Image{Ref: r.String(), cache: opts.Cache, progress: opts.Progress, maxBytes: maxBytes}
	var img v1.Image
	switch {
	case desc.MediaType.IsIndex():
		im.IndexDigest = desc.Digest.String()
		img, err = pickPlatform(r, desc)
	case desc.MediaType.IsImage():
		img, err = desc.Image()
	default:
		err = fmt.Errorf("%s is a %q: %w", r, desc.MediaType, ErrNotAnImage)
	}
	if err != nil {
		return nil, err
	}
	if err := im.load(r, img); err != nil {
		return nil, err
	}
	opts.Progress.Report(progress.Event{Phase: "resolve", Item: r.String(), Message: im.Digest, Done: true})
	return im, nil
}

// pickPlatform returns the linux/amd64 image of an index, or an error that
// lists the platforms the index has.
func pickPlatform(r name.Reference, desc *remote.Descriptor) (v1.Image, error) {
	idx, err := desc.ImageIndex()
	if err != nil {
		return nil, fmt.Errorf("read index %s: %w", r, err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("read index %s: %w", r, err)
	}
	var have []string
	for _, d := range m.Manifests {
		if d.Platform == nil {
			continue
		}
		if d.MediaType.IsImage() && d.Platform.Satisfies(Platform) {
			img, err := idx.Image(d.Digest)
			if err != nil {
				return nil, fmt.Errorf("read %s image of %s: %w", Platform, r, err)
			}
			return img, nil
		}
		if p := d.Platform.String(); p != "unknown/unknown" && !slices.Contains(have, p) {
			have = append(have, p)
		}
	}
	if len(have) == 0 {
		return nil, fmt.Errorf("%s: %w; the index names no platforms", r, ErrPlatformNotFound)
	}
	return nil, fmt.Errorf("%s: %w; it has %s", r, ErrPlatformNotFound, strings.Join(have, ", "))
}

// load fills im from a single-platform image.
func (im *Image) load(r name.Reference, img v1.Image) error {
	d, err := img.Digest()
	if err != nil {
		return fmt.Errorf("digest of %s: %w", r, err)
	}
	im.Digest = d.String()
	mf, err := img.Manifest()
	if err != nil {
		return fmt.Errorf("read manifest of %s: %w", r, err)
	}
	switch mf.Config.MediaType {
	case types.DockerConfigJSON, types.OCIConfigJSON, "":
	default:
		return fmt.Errorf("%s has config type %q: %w", r, mf.Config.MediaType, ErrNotAnImage)
	}
	if mf.Config.Size <= 0 || mf.Config.Size > MaxConfigBytes {
		return fmt.Errorf("%s: config blob of %d bytes (at most %d are read): %w", r, mf.Config.Size, MaxConfigBytes, ErrTooLarge)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("read config of %s: %w", r, err)
	}
	// A single-platform manifest can still be for another platform.
	if cfg.OS != "" && (cfg.OS != Platform.OS || cfg.Architecture != Platform.Architecture) {
		got := cfg.OS + "/" + cfg.Architecture
		if cfg.Variant != "" {
			got += "/" + cfg.Variant
		}
		return fmt.Errorf("%s: %w; it has %s", r, ErrPlatformNotFound, got)
	}
	im.Config = runConfig(cfg)
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("list layers of %s: %w", r, err)
	}
	if len(layers) != len(mf.Layers) {
		return fmt.Errorf("%s: manifest lists %d layers, image has %d", r, len(mf.Layers), len(layers))
	}
	var total int64
	for i, l := range mf.Layers {
		switch l.MediaType {
		case types.DockerLayer, types.OCILayer, types.OCILayerZStd, types.OCIUncompressedLayer, types.DockerUncompressedLayer:
		default:
			return fmt.Errorf("%s: layer %d (%s) has media type %q: %w", r, i, l.Digest, l.MediaType, ErrNotAnImage)
		}
		if _, err := digestHex(l.Digest.String()); err != nil {
			return fmt.Errorf("%s: layer %d: %w", r, i, err)
		}
		if total += l.Size; l.Size <= 0 || total > im.maxBytes {
			return fmt.Errorf("%s: layer %d (%s) declares %d bytes, bringing the layers to %d, over the limit of %d: %w",
				r, i, l.Digest, l.Size, total, im.maxBytes, ErrTooLarge)
		}
		im.layers = append(im.layers, Layer{Digest: l.Digest.String(), Size: l.Size, MediaType: string(l.MediaType)})
	}
	im.remote = layers
	return nil
}

// OpenLayer returns the uncompressed tar stream of layer i (oldest is 0),
// downloading its blob into the cache first when it is not there. Close
// reports a blob whose content does not match its digest (ErrDigestMismatch);
// callers must check it before trusting what they read.
func (im *Image) OpenLayer(ctx context.Context, i int) (io.ReadCloser, error) {
	if i < 0 || i >= len(im.layers) {
		return nil, fmt.Errorf("layer %d out of range (image has %d)", i, len(im.layers))
	}
	l := im.layers[i]
	rl := im.remote[i]
	unlock, err := im.flights.lock(ctx, l.Digest)
	if err != nil {
		return nil, fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
	}
	blob, err := im.cache.OpenBlob(ctx, l.Digest, l.Size, func(context.Context) (io.ReadCloser, error) {
		return rl.Compressed()
	}, im.progress)
	unlock()
	if err != nil {
		return nil, fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
	}
	rc, err := decompress(blob)
	if err != nil {
		_ = blob.Close()
		return nil, fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
	}
	return rc, nil
}

// Prefetch downloads layer i into the cache if it is not there (see
// Prefetcher).
func (im *Image) Prefetch(ctx context.Context, i int) error {
	if i < 0 || i >= len(im.layers) {
		return fmt.Errorf("layer %d out of range (image has %d)", i, len(im.layers))
	}
	l, rl := im.layers[i], im.remote[i]
	unlock, err := im.flights.lock(ctx, l.Digest)
	if err != nil {
		return err
	}
	defer unlock()
	return im.cache.Ensure(ctx, l.Digest, l.Size, func(context.Context) (io.ReadCloser, error) {
		return rl.Compressed()
	}, im.progress)
}

// deadlineTransport is base with a read deadline of stall on every
// connection it dials: a registry that sends nothing for that long, in a
// response header or mid-blob, fails the read with os.ErrDeadlineExceeded.
func deadlineTransport(base *http.Transport, stall time.Duration) *http.Transport {
	t := base.Clone()
	dial := t.DialContext
	if dial == nil {
		dial = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	}
	t.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &deadlineConn{Conn: c, stall: stall}, nil
	}
	return t
}

// deadlineConn renews its read deadline before every read.
type deadlineConn struct {
	net.Conn
	stall time.Duration
}

func (c *deadlineConn) Read(p []byte) (int, error) {
	if err := c.SetReadDeadline(time.Now().Add(c.stall)); err != nil {
		return 0, err
	}
	return c.Conn.Read(p)
}

// existingParent is dir, or its nearest ancestor that exists (the cache
// directory is made on first download).
func existingParent(dir string) string {
	for {
		if _, err := os.Stat(dir); err == nil || dir == filepath.Dir(dir) {
			return dir
		}
		dir = filepath.Dir(dir)
	}
}

// decompress sniffs the blob's compression (gzip, zstd or none) from its
// first bytes rather than trusting the media type. Reading (and hashing)
// the blob, decompressing it and the caller's tar parsing run as three
// pipelined goroutines with a few read-ahead buffers between them
// (readAhead): on a busy machine one core each, not all three on one.
func decompress(blob io.ReadCloser) (io.ReadCloser, error) {
	if !pipelineLayers {
		return decompressInline(blob)
	}
	raw := newReadAhead(blob, 4, 256<<10)
	br := bufio.NewReaderSize(raw, 64<<10)
	l := &layerReader{Reader: br, blob: blob, raw: raw}
	magic, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		_ = raw.Close()
		return nil, fmt.Errorf("read layer: %w", err)
	}
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			_ = raw.Close()
			return nil, fmt.Errorf("gunzip layer: %w", err)
		}
		l.zclose = zr.Close
		l.out = newReadAhead(zr, 4, 1<<20)
	case len(magic) == 4 && magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd:
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			_ = raw.Close()
			return nil, fmt.Errorf("unzstd layer: %w", err)
		}
		l.zclose = func() error { zr.Close(); return nil }
		l.out = newReadAhead(zr, 4, 1<<20)
	}
	if l.out != nil {
		l.Reader = l.out
	}
	return l, nil
}

// pipelineLayers turns decompress's read-ahead goroutines on; only the
// benchmark turns it off, to measure what they give.
var pipelineLayers = true

// decompressInline is decompress with every stage in the caller's
// goroutine.
func decompressInline(blob io.ReadCloser) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(blob, 1<<20)
	magic, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read layer: %w", err)
	}
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("gunzip layer: %w", err)
		}
		return &layerReader{Reader: zr, zclose: zr.Close, blob: blob}, nil
	case len(magic) == 4 && magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd:
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("unzstd layer: %w", err)
		}
		return &layerReader{Reader: zr, zclose: func() error { zr.Close(); return nil }, blob: blob}, nil
	default:
		return &layerReader{Reader: br, blob: blob}, nil
	}
}

// layerReader is a decompressed layer whose Close also closes (and so
// verifies) the compressed blob. Its read-ahead goroutines are stopped
// first, outermost first, so nothing reads a reader being closed.
type layerReader struct {
	io.Reader
	out    *readAhead // decompressed stream (nil: not compressed)
	zclose func() error
	raw    *readAhead // the blob (nil: read inline)
	blob   io.ReadCloser
}

func (l *layerReader) Close() error {
	if l.out != nil {
		_ = l.out.Close()
	}
	var zerr error
	if l.zclose != nil {
		zerr = l.zclose()
	}
	if l.raw != nil {
		_ = l.raw.Close()
	}
	if err := l.blob.Close(); err != nil {
		return err
	}
	return zerr
}
