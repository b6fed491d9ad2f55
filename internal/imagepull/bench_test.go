package imagepull

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
)

// phaseTimer records how long named phases take, in order.
type phaseTimer struct {
	names []string
	durs  map[string]time.Duration
}

func (p *phaseTimer) time(name string, fn func()) {
	if p.durs == nil {
		p.durs = map[string]time.Duration{}
	}
	start := time.Now()
	fn()
	p.names = append(p.names, name)
	p.durs[name] += time.Since(start)
}

func (p *phaseTimer) total() time.Duration {
	var d time.Duration
	for _, v := range p.durs {
		d += v
	}
	return d
}

// bangerTimed runs the pull pipeline with phases split: resolve (manifest),
// download (all layers into the cache; nothing when warm), flatten, mkfs,
// ownership.
func bangerTimed(t *testing.T, ctx context.Context, ref string, cache *Cache, work string) *phaseTimer {
	pt := &phaseTimer{}
	var img *Image
	var md Metadata
	var err error
	pt.time("resolve", func() { img, err = Pull(ctx, ref, PullOptions{Cache: cache}) })
	if err != nil {
		t.Fatal(err)
	}
	pt.time("download", func() {
		for i := range img.Layers() {
			if err = img.Prefetch(ctx, i); err != nil {
				t.Fatal(err)
			}
		}
	})
	staging := filepath.Join(work, "staging")
	if err := os.Mkdir(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	pt.time("flatten", func() { md, err = Flatten(ctx, img, staging, FlattenOptions{}) })
	if err != nil {
		t.Fatal(err)
	}
	ext4 := filepath.Join(work, "rootfs.ext4")
	pt.time("mkfs", func() { err = BuildExt4(ctx, staging, ext4, DefaultSize(md.ContentBytes())) })
	if err != nil {
		t.Fatal(err)
	}
	pt.time("ownership", func() { err = ApplyOwnership(ctx, ext4, md) })
	if err != nil {
		t.Fatal(err)
	}
	return pt
}

// TestBenchPull measures banger's pull of the Debian test image (cold and
// warm blob cache, by phase) against the reference pipeline (skopeo copy to
// an OCI layout, umoci unpack as root, mkfs.ext4 -d), in the same run, and
// prints a table. Run it with:
//
//	BANGER_BENCH=1 go test ./internal/imagepull -run TestBenchPull -v -count=1 -timeout 30m
func TestBenchPull(t *testing.T) {
	testutil.OptIn(t, "BANGER_BENCH", "the pull benchmark")
	testutil.RequiresRoot(t)
	testutil.RequiresTool(t, "docker-registry", "skopeo", "umoci", "mkfs.ext4", "debugfs")
	ctx := context.Background()
	host := startDockerRegistry(t)
	ref := pushDebianImage(t, host)

	syncDisks := func() {
		_ = exec.Command("sync").Run()
	}
	cache := &Cache{Dir: filepath.Join(t.TempDir(), "cache")}
	syncDisks()
	cold := bangerTimed(t, ctx, ref, cache, t.TempDir())
	syncDisks()
	warm := bangerTimed(t, ctx, ref, cache, t.TempDir())

	// The reference pipeline.
	refT := &phaseTimer{}
	dir := t.TempDir()
	layout := filepath.Join(dir, "layout")
	bundle := filepath.Join(dir, "bundle")
	syncDisks()
	refT.time("skopeo copy", func() {
		run(t, "skopeo", "copy", "--src-tls-verify=false", "docker://"+ref, "oci:"+layout+":test")
	})
	refT.time("umoci unpack", func() { run(t, "umoci", "unpack", "--image", layout+":test", bundle) })
	refT.time("mkfs.ext4 -d", func() {
		ext4 := filepath.Join(dir, "ref.ext4")
		f, err := os.Create(ext4)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(1 << 30); err != nil {
			t.Fatal(err)
		}
		f.Close()
		run(t, "mkfs.ext4", "-q", "-F", "-d", filepath.Join(bundle, "rootfs"), ext4)
	})

	var b strings.Builder
	fmt.Fprintf(&b, "\n%-14s %10s %10s\n", "banger phase", "cold", "warm")
	for _, n := range cold.names {
		fmt.Fprintf(&b, "%-14s %10.2fs %9.2fs\n", n, cold.durs[n].Seconds(), warm.durs[n].Seconds())
	}
	fmt.Fprintf(&b, "%-14s %10.2fs %9.2fs\n", "total", cold.total().Seconds(), warm.total().Seconds())
	fmt.Fprintf(&b, "\n%-14s %10s\n", "reference", "")
	for _, n := range refT.names {
		fmt.Fprintf(&b, "%-14s %10.2fs\n", n, refT.durs[n].Seconds())
	}
	fmt.Fprintf(&b, "%-14s %10.2fs\n", "total", refT.total().Seconds())
	fmt.Fprintf(&b, "\nratio banger/reference: cold %.2fx, warm %.2fx (goal <= 1.5x)\n",
		cold.total().Seconds()/refT.total().Seconds(), warm.total().Seconds()/refT.total().Seconds())
	t.Log(b.String())
}
