package imagepull

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

func blobFiles(t testing.TB, cache *Cache) map[string]int64 {
	t.Helper()
	dir := filepath.Join(cache.Dir, "oci", "blobs", "sha256")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, e := range ents {
		info, _ := e.Info()
		out[e.Name()] = info.Size()
	}
	return out
}

func TestCacheLayoutAndCorruptBlob(t *testing.T) {
	reg := newRegistry(t, nil)
	ref := reg.pushLayers(t, "c/img:v1", makeTar(t, file("a", "alpha")), makeTar(t, file("b", "beta")))
	cache := &Cache{Dir: t.TempDir()}
	if _, _, err := pullFlatten(t, cache, ref, FlattenOptions{}); err != nil {
		t.Fatal(err)
	}
	img, err := Pull(context.Background(), ref, PullOptions{Cache: cache})
	if err != nil {
		t.Fatal(err)
	}
	files := blobFiles(t, cache)
	for _, l := range img.Layers() {
		hexd := strings.TrimPrefix(l.Digest, "sha256:")
		if files[hexd] != l.Size {
			t.Errorf("blob %s: cache has %d bytes at oci/blobs/sha256/%s, want %d", l.Digest, files[hexd], hexd, l.Size)
		}
	}
	if len(files) != 2 {
		t.Errorf("cache holds %v, want exactly the 2 layer blobs", files)
	}

	// Flip one byte of a cached blob: the next flatten must fail with
	// ErrDigestMismatch and drop the blob; the one after re-downloads it.
	p, _ := cache.BlobPath(img.Layers()[1].Digest)
	data, _ := os.ReadFile(p)
	data[len(data)/2] ^= 0xff
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := pullFlatten(t, cache, ref, FlattenOptions{}); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Flatten over a corrupt cached blob = %v, want ErrDigestMismatch", err)
	}
	// The corrupt bytes must be gone. Flatten's background prefetch may
	// already have downloaded the layer again (it runs while layer 0 is
	// replayed, and finds the blob missing once the read dropped it), so a
	// blob at p is fine as long as it is the right one.
	if got, err := os.ReadFile(p); err == nil && bytes.Equal(got, data) {
		t.Errorf("corrupt blob still in the cache at %s", p)
	} else if err == nil {
		if sum := sha256.Sum256(got); "sha256:"+hex.EncodeToString(sum[:]) != img.Layers()[1].Digest {
			t.Errorf("blob at %s hashes to %x, want %s", p, sum, img.Layers()[1].Digest)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("read %s: %v", p, err)
	}
	_, staging, err := pullFlatten(t, cache, ref, FlattenOptions{})
	if err != nil {
		t.Fatalf("Flatten after the corrupt blob was dropped: %v", err)
	}
	if got := readFile(t, staging, "b"); got != "beta" {
		t.Errorf("b = %q", got)
	}
}

func TestCacheRejectsWrongDownload(t *testing.T) {
	cache := &Cache{Dir: t.TempDir()}
	content := "the real content"
	sum := sha256.Sum256([]byte(content))
	digest := "sha256:" + hex.EncodeToString(sum[:])
	for name, served := range map[string]string{"tampered": "the real c0ntent", "short": "the real", "long": content + "!"} {
		_, err := cache.OpenBlob(context.Background(), digest, int64(len(content)), func(context.Context) (io.ReadCloser, error) {
			return io.NopCloser(strings.NewReader(served)), nil
		}, nil)
		if !errors.Is(err, ErrDigestMismatch) {
			t.Errorf("%s download: OpenBlob = %v, want ErrDigestMismatch", name, err)
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(cache.Dir, "oci", "blobs", "sha256")); len(ents) != 0 {
		t.Errorf("failed downloads left %v in the cache", ents)
	}
	for _, bad := range []string{"sha256:abc", "md5:" + strings.Repeat("0", 64), "sha256:" + strings.Repeat("A", 64), "sha256:../../" + strings.Repeat("0", 58)} {
		if _, err := cache.BlobPath(bad); !errors.Is(err, ErrInvalidDigest) {
			t.Errorf("BlobPath(%q) = %v, want ErrInvalidDigest", bad, err)
		}
	}
}

// TestCacheConcurrentPulls runs pulls that share a base layer at the same
// time, through one Cache value (one daemon) and through separate values on
// the same directory (separate processes).
func TestCacheConcurrentPulls(t *testing.T) {
	reg := newRegistry(t, nil)
	base := makeTar(t, dir("usr"), file("usr/big", strings.Repeat("0123456789", 300_000)))
	var refs []string
	for i := range 4 {
		refs = append(refs, reg.pushLayers(t, fmt.Sprintf("conc/img%d:v1", i), base, makeTar(t, file("id", fmt.Sprint(i)))))
	}
	dir := t.TempDir()
	shared := &Cache{Dir: dir}
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range 8 {
		cache := shared
		if i%2 == 1 {
			cache = &Cache{Dir: dir} // another "process"
		}
		wg.Go(func() {
			md, staging, err := pullFlatten(t, cache, refs[i%4], FlattenOptions{})
			if err == nil && (readFile(t, staging, "id") != fmt.Sprint(i%4) || md["usr/big"].Size != 3_000_000 ||
				readFile(t, staging, "usr/big") != strings.Repeat("0123456789", 300_000)) {
				err = fmt.Errorf("pull %d flattened wrong content", i)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("pull %d: %v", i, err)
		}
	}
	files := blobFiles(t, &Cache{Dir: dir})
	if len(files) != 5 {
		t.Errorf("cache holds %d files, want 5 blobs (shared base + 4 tops) and no temp files: %v", len(files), files)
	}
	// Every blob hashes to its name.
	for name := range files {
		data, _ := os.ReadFile(filepath.Join(dir, "oci", "blobs", "sha256", name))
		if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != name {
			t.Errorf("blob %s is corrupt", name)
		}
	}
}

func TestCachePrune(t *testing.T) {
	reg := newRegistry(t, nil)
	shared := makeTar(t, file("shared", strings.Repeat("s", 10_000)))
	keepRef := reg.pushLayers(t, "p/keep:v1", shared, makeTar(t, file("k", "keep")))
	dropRef := reg.pushLayers(t, "p/drop:v1", shared, makeTar(t, file("d", strings.Repeat("d", 50_000))))
	cache := &Cache{Dir: t.TempDir()}
	var keepImg, dropImg *Image
	for _, r := range []struct {
		ref string
		img **Image
	}{{keepRef, &keepImg}, {dropRef, &dropImg}} {
		if _, _, err := pullFlatten(t, cache, r.ref, FlattenOptions{}); err != nil {
			t.Fatal(err)
		}
		img, err := Pull(context.Background(), r.ref, PullOptions{Cache: cache})
		if err != nil {
			t.Fatal(err)
		}
		*r.img = img
	}
	blobDir := filepath.Join(cache.Dir, "oci", "blobs", "sha256")
	// A crashed download (no lock) and a live one (locked).
	stale := filepath.Join(blobDir, ".tmp-"+strings.Repeat("a", 64)+"-dead")
	os.WriteFile(stale, make([]byte, 123), 0o600)
	live := filepath.Join(blobDir, ".tmp-"+strings.Repeat("b", 64)+"-live")
	os.WriteFile(live, make([]byte, 7), 0o600)
	lf, _ := os.Open(live)
	defer lf.Close()
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}

	keep := map[string]bool{}
	for _, d := range keepImg.LayerDigests() {
		keep[d] = true
	}
	dropped := dropImg.Layers()[1]
	removed, freed, err := cache.Prune(context.Background(), keep)
	if err != nil {
		t.Fatal(err)
	}
	if removed != 1 || freed != dropped.Size+123 {
		t.Errorf("Prune = %d blobs, %d bytes; want 1 blob, %d bytes (%d blob + 123 stale temp)", removed, freed, dropped.Size+123, dropped.Size)
	}
	for _, d := range keepImg.LayerDigests() {
		if p, _ := cache.BlobPath(d); !exists(p) {
			t.Errorf("kept blob %s was removed", d)
		}
	}
	if p, _ := cache.BlobPath(dropped.Digest); exists(p) || exists(stale) || !exists(live) {
		t.Errorf("after Prune: dropped blob present %v, stale temp present %v, live temp present %v", exists(p), exists(stale), exists(live))
	}
	// Idempotent; and the image whose blob went re-downloads.
	if removed, freed, _ := cache.Prune(context.Background(), keep); removed != 0 || freed != 0 {
		t.Errorf("second Prune = %d, %d; want 0, 0", removed, freed)
	}
	if _, _, err := pullFlatten(t, cache, dropRef, FlattenOptions{}); err != nil {
		t.Errorf("pull after prune: %v", err)
	}
}

func exists(p string) bool { _, err := os.Lstat(p); return err == nil }
