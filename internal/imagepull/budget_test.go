package imagepull

import (
	"archive/tar"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/testutil"
)

// xattrBomb is a layer of n entries, each with a PAX xattr of valueBytes:
// a few KiB compressed, n × valueBytes decompressed.
func xattrBomb(t testing.TB, n, valueBytes int) []byte {
	var entries []entry
	for i := range n {
		entries = append(entries, entry{name: fmt.Sprintf("f%03d", i), typ: tar.TypeReg, mode: 0o644,
			xattrs: map[string]string{"user.bomb": strings.Repeat("a", valueBytes)}})
	}
	return makeTar(t, entries...)
}

// TestFlattenBudgetCountsEveryByte holds the decompression budget against
// what the old per-file count missed: xattrs in PAX headers and the bodies
// of entries that are skipped (whiteouts).
func TestFlattenBudgetCountsEveryByte(t *testing.T) {
	for _, tc := range []struct {
		name   string
		layers [][]byte
		opts   FlattenOptions
	}{
		// 64 entries with 1000 KiB xattrs: about 64 MiB decompressed.
		{"xattr-bomb-under-1MiB", [][]byte{xattrBomb(t, 64, 1000<<10)}, FlattenOptions{MaxBytes: 1 << 20}},
		// The same bomb against the default budget: one entry's xattrs
		// are more than ext4 can hold.
		{"xattr-bomb-default", [][]byte{xattrBomb(t, 64, 1000<<10)}, FlattenOptions{}},
		// Many modest xattrs add up too.
		{"xattr-total", [][]byte{xattrBomb(t, 5000, 3900)}, FlattenOptions{}},
		{"whiteout-body", [][]byte{makeTar(t, file("x", "x")), makeTar(t, file(".wh.x", strings.Repeat("\x00", 8<<20)))}, FlattenOptions{MaxBytes: 1 << 20}},
		{"dir-body", [][]byte{makeTar(t, file("d/.wh..wh..opq", strings.Repeat("\x00", 8<<20)))}, FlattenOptions{MaxBytes: 1 << 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := flattenLayers(t, tc.opts, tc.layers...)
			if !errors.Is(err, ErrTooLarge) {
				t.Fatalf("Flatten = %v, want ErrTooLarge", err)
			}
		})
	}
}

func TestBudget(t *testing.T) {
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * st.Bsize
	got, err := Budget(dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Others write to the disk meanwhile: allow some slack.
	if want := free - FreeSpaceReserve; got > want+(64<<20) || got < want-(1<<30) {
		t.Errorf("Budget(%s, 0) = %d, want about %d (free %d minus the reserve)", dir, got, want, free)
	}
	if got, err := Budget(dir, 12345); err != nil || got != 12345 {
		t.Errorf("Budget(%s, 12345) = %d, %v; want the smaller limit", dir, got, err)
	}
}

// TestFlattenDefaultBudgetIsFreeSpace stages on a small tmpfs: an image
// bigger than its free space (minus the reserve) is refused up front
// instead of filling the disk.
func TestFlattenDefaultBudgetIsFreeSpace(t *testing.T) {
	testutil.RequiresRoot(t)
	mnt := t.TempDir()
	size := FreeSpaceReserve + 4<<20
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d,mode=0700", size), "banger-ext4-budget", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = unix.Unmount(mnt, unix.MNT_DETACH) })
	staging := filepath.Join(mnt, "staging")
	if err := os.Mkdir(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	reg := newRegistry(t, nil)
	ref := reg.pushLayers(t, "budget/free:v1", makeTar(t, file("big", strings.Repeat("\x00", 16<<20))))
	img, err := Pull(context.Background(), ref, PullOptions{Cache: &Cache{Dir: t.TempDir()}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = Flatten(context.Background(), img, staging, FlattenOptions{})
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Flatten of 16 MiB onto %d bytes free = %v, want ErrTooLarge", size, err)
	}
}

func TestPullCapsConfigAndBlobs(t *testing.T) {
	reg := newRegistry(t, nil)
	noise := make([]byte, 50_000)
	_, _ = rand.Read(noise)
	img := buildImage(t, "amd64", makeTar(t, file("x", hex.EncodeToString(noise))))
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Config.Labels = map[string]string{"pad": strings.Repeat("p", MaxConfigBytes)}
	big, err := mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.push(t, "caps/config:v1", big)
	if _, err := Pull(context.Background(), ref, PullOptions{Cache: &Cache{Dir: t.TempDir()}}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("Pull of an image with a %d-byte config = %v, want ErrTooLarge", MaxConfigBytes, err)
	}

	ref = reg.push(t, "caps/blob:v1", img)
	if _, err := Pull(context.Background(), ref, PullOptions{Cache: &Cache{Dir: t.TempDir()}, MaxBytes: 1000}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("Pull with MaxBytes 1000 of a bigger layer = %v, want ErrTooLarge", err)
	}
	if _, err := Pull(context.Background(), ref, PullOptions{Cache: &Cache{Dir: t.TempDir()}}); err != nil {
		t.Errorf("Pull with the default cap: %v", err)
	}
}

// TestStalledRegistryDoesNotBlockOthers: one pull's registry stops sending
// a layer mid-blob. Another pull of the same layer from a healthy registry,
// through the same cache, finishes meanwhile; the stalled pull fails with
// ErrStalled once its stall timeout passes.
func TestStalledRegistryDoesNotBlockOthers(t *testing.T) {
	layer := makeTar(t, file("big", strings.Repeat("0123456789abcdef", 1<<16)))
	img := buildImage(t, "amd64", layer)
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	ld, err := layers[0].Digest()
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	stalled := newRegistry(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+ld.String()) {
				next.ServeHTTP(w, r)
				return
			}
			w.Header().Set("Content-Type", "application/octet-stream")
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(make([]byte, 1000))
			w.(http.Flusher).Flush()
			select {
			case started <- struct{}{}:
			default:
			}
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
	})
	t.Cleanup(func() { close(release) }) // before the server's Close
	healthy := newRegistry(t, nil)
	stalledRef := stalled.push(t, "stall/img:v1", img)
	healthyRef := healthy.push(t, "stall/img:v1", img)

	cache := &Cache{Dir: t.TempDir()}
	const stall = 8 * time.Second
	var wg sync.WaitGroup
	var stalledErr error
	var stalledDone time.Time
	begin := time.Now()
	wg.Go(func() {
		im, err := Pull(context.Background(), stalledRef, PullOptions{Cache: cache, StallTimeout: stall})
		if err == nil {
			staging := t.TempDir()
			_, err = Flatten(context.Background(), im, staging, FlattenOptions{})
		}
		stalledErr, stalledDone = err, time.Now()
	})
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the stalled registry never served the layer")
	}
	md, _, err := pullFlatten(t, cache, healthyRef, FlattenOptions{})
	healthyDone := time.Now()
	if err != nil {
		t.Errorf("healthy pull while another stalls: %v", err)
	} else if md["big"].Size != 16<<16 {
		t.Errorf("healthy pull: big is %d bytes", md["big"].Size)
	}
	wg.Wait()
	if !errors.Is(stalledErr, ErrStalled) {
		t.Errorf("stalled pull = %v, want ErrStalled", stalledErr)
	} else if !strings.Contains(stalledErr.Error(), "pull again") {
		t.Errorf("stalled pull error %q does not say what to do", stalledErr)
	}
	if !healthyDone.Before(stalledDone) {
		t.Errorf("healthy pull finished %v after the start, after the stalled one gave up (%v): it waited for it",
			healthyDone.Sub(begin), stalledDone.Sub(begin))
	}
	if d := stalledDone.Sub(begin); d > stall+20*time.Second {
		t.Errorf("stalled pull took %v to fail with a stall timeout of %v", d, stall)
	}
}

func TestFlightLockHonoursCancellation(t *testing.T) {
	var f flights
	unlock, err := f.lock(context.Background(), "sha256:x")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := f.lock(ctx, "sha256:x"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("lock of a held key with a 100 ms deadline = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("cancelled wait took %v", d)
	}
	// Another key is free; the key itself is free again after unlock.
	if u, err := f.lock(context.Background(), "sha256:y"); err != nil {
		t.Errorf("lock of another key: %v", err)
	} else {
		u()
	}
	unlock()
	if u, err := f.lock(context.Background(), "sha256:x"); err != nil {
		t.Errorf("lock after unlock: %v", err)
	} else {
		u()
	}
}
