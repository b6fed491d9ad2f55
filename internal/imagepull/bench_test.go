package imagepull

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

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
// download (all layers into the cache; nothing when warm), then for the
// direct builder scan and write (tar2ext4, resize, journal), for the
// staging builder flatten, mkfs and ownership. It returns the phases and
// the peak RSS of this process during the pull (VmHWM, reset first).
func bangerTimed(t *testing.T, ctx context.Context, ref string, cache *Cache, work string, builder Builder) (*phaseTimer, int64) {
	resetPeakRSS(t)
	pt := &phaseTimer{}
	var img *Image
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
	ext4 := filepath.Join(work, "rootfs.ext4")
	if builder == BuilderDirect {
		var tree *Tree
		pt.time("scan", func() { tree, err = Scan(ctx, img, work, FlattenOptions{}) })
		if err != nil {
			t.Fatal(err)
		}
		pt.time("write ext4", func() { err = tree.WriteExt4(ctx, img, ext4, DefaultSize(DiskUsage(tree.Metadata()))) })
		if err != nil {
			t.Fatal(err)
		}
		return pt, peakRSS(t)
	}
	staging := filepath.Join(work, "staging")
	if err := os.Mkdir(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	var md Metadata
	pt.time("flatten", func() { md, err = Flatten(ctx, img, staging, FlattenOptions{}) })
	if err != nil {
		t.Fatal(err)
	}
	pt.time("mkfs", func() { err = BuildExt4(ctx, staging, ext4, DefaultSize(DiskUsage(md))) })
	if err != nil {
		t.Fatal(err)
	}
	pt.time("ownership", func() { err = ApplyOwnership(ctx, ext4, md) })
	if err != nil {
		t.Fatal(err)
	}
	return pt, peakRSS(t)
}

// resetPeakRSS resets this process's VmHWM (clear_refs 5).
func resetPeakRSS(t *testing.T) {
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0o600); err != nil {
		t.Logf("reset peak RSS: %v", err)
	}
}

// peakRSS is this process's VmHWM in bytes.
func peakRSS(t *testing.T) int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// runRSS runs a reference tool and returns its peak RSS.
func runRSS(t *testing.T, name string, args ...string) int64 {
	t.Helper()
	cmd := exec.Command(name, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		return ru.Maxrss << 10
	}
	return 0
}

// largeImagePackages are the Debian packages of the large benchmark image
// (on top of minbase): at least 600 MB and 30k entries. build-essential,
// python3 and git with the standard test set came to 587 MB and 17.8k
// entries; the kernel headers add the many small files real developer
// images have.
var largeImagePackages = []string{"build-essential", "python3", "git", "linux-headers-amd64", "systemd", "systemd-sysv", "openssh-server", "sudo", "iproute2", "udev", "kmod"}

// tarStats counts the entries and content bytes of a tarball.
func tarStats(t *testing.T, p string) (entries int, bytes int64) {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return entries, bytes
		}
		if err != nil {
			t.Fatal(err)
		}
		entries++
		bytes += h.Size
	}
}

// pushRootfsImage pushes a one-layer image of a root filesystem tarball.
func pushRootfsImage(t *testing.T, host, tarPath, repo string) string {
	t.Helper()
	gz := gzipFile(t, tarPath, t.TempDir())
	layer, err := tarball.LayerFromFile(gz)
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(buildImage(t, "amd64"), layer)
	if err != nil {
		t.Fatal(err)
	}
	ref := host + "/" + repo
	tag, _ := name.ParseReference(ref)
	if err := remote.Write(tag, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return ref
}

// TestBenchPull measures banger's pull (both builders, cold and warm blob
// cache, by phase, with the peak RSS of the pulling process) against the
// reference pipeline (skopeo copy to an OCI layout, umoci unpack as root,
// mkfs.ext4 -d), in the same run, for the Debian test image and a large
// image built from Debian packages (build-essential, python3, git), and
// prints a table per image. Staging and images are on the shared disk
// (t.TempDir), not tmpfs. Run it with:
//
//	BANGER_BENCH=1 go test ./internal/imagepull -run TestBenchPull -v -count=1 -timeout 60m
func TestBenchPull(t *testing.T) {
	testutil.OptIn(t, "BANGER_BENCH", "the pull benchmark")
	testutil.RequiresRoot(t)
	testutil.RequiresTool(t, "docker-registry", "skopeo", "umoci", "mkfs.ext4", "debugfs", "resize2fs", "tune2fs")
	ctx := context.Background()
	host := startDockerRegistry(t)
	large := testutil.DebianRootfsTar(t, "large", largeImagePackages)
	if n, b := tarStats(t, large); n < 30000 || b < 600<<20 {
		t.Errorf("the large image has %d entries and %d MiB; the benchmark wants at least 30k and 600 MiB", n, b>>20)
	} else {
		t.Logf("large image: %d entries, %d MiB", n, b>>20)
	}
	images := []struct{ name, ref string }{
		{"debian (2 layers)", pushDebianImage(t, host)},
		{"large (build-essential, python3, git, kernel headers)", pushRootfsImage(t, host, large, "banger/large:test")},
	}
	for _, im := range images {
		benchImage(t, ctx, im.name, im.ref)
	}
}

// TestBenchDirectStages measures, on the large image with a warm blob
// cache, what the direct builder's layer spools and read-ahead goroutines
// give: rounds alternate between them off (every layer decompressed twice,
// all stages on one goroutine) and on, and report wall time and the
// process's CPU time (user + system) per pull; CPU time does not depend on
// the machine's load. Run it with:
//
//	BANGER_BENCH=1 go test ./internal/imagepull -run TestBenchDirectStages -v -count=1 -timeout 60m
func TestBenchDirectStages(t *testing.T) {
	testutil.OptIn(t, "BANGER_BENCH", "the direct builder's stage benchmark")
	testutil.RequiresRoot(t)
	testutil.RequiresTool(t, "docker-registry", "debugfs", "resize2fs", "tune2fs", "e2fsck")
	ctx := context.Background()
	host := startDockerRegistry(t)
	ref := pushRootfsImage(t, host, testutil.DebianRootfsTar(t, "large", largeImagePackages), "banger/large:test")
	cache := &Cache{Dir: filepath.Join(t.TempDir(), "cache")}
	defer func() { pipelineLayers, spoolLayers = true, true }()
	cpu := func() time.Duration {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	sum := map[bool][2]time.Duration{}
	for round := range 3 {
		for _, on := range []bool{false, true} {
			pipelineLayers, spoolLayers = on, on
			work := t.TempDir()
			c0 := cpu()
			pt, rss := bangerTimed(t, ctx, ref, cache, work, BuilderDirect)
			c := cpu() - c0
			_ = os.RemoveAll(work)
			if round == 0 {
				continue // the cold pull: downloads, and warms the page cache
			}
			s := sum[on]
			sum[on] = [2]time.Duration{s[0] + pt.total(), s[1] + c}
			t.Logf("round %d, spools and read-ahead %v: wall %.2fs (scan %.2fs, write ext4 %.2fs), CPU %.2fs, peak RSS %d MiB",
				round, on, pt.total().Seconds(), pt.durs["scan"].Seconds(), pt.durs["write ext4"].Seconds(), c.Seconds(), rss>>20)
		}
	}
	t.Logf("on / off: wall %.2fx, CPU %.2fx", sum[true][0].Seconds()/sum[false][0].Seconds(), sum[true][1].Seconds()/sum[false][1].Seconds())
}

func benchImage(t *testing.T, ctx context.Context, label, ref string) {
	syncDisks := func() { _ = exec.Command("sync").Run() }
	type run struct {
		name string
		pt   *phaseTimer
		rss  int64
	}
	var runs []run
	for _, builder := range []Builder{BuilderDirect, BuilderStaging} {
		cache := &Cache{Dir: filepath.Join(t.TempDir(), "cache")}
		for _, temp := range []string{"cold", "warm"} {
			syncDisks()
			work := t.TempDir()
			pt, rss := bangerTimed(t, ctx, ref, cache, work, builder)
			runs = append(runs, run{name: string(builder) + " " + temp, pt: pt, rss: rss})
			_ = os.RemoveAll(work)
		}
	}

	// The reference pipeline, cold (fresh layout) and warm (the layout is
	// there: skopeo copies nothing new).
	refT := map[string]*phaseTimer{}
	refRSS := map[string]int64{}
	dir := t.TempDir()
	layout := filepath.Join(dir, "layout")
	for _, temp := range []string{"cold", "warm"} {
		pt := &phaseTimer{}
		bundle := filepath.Join(dir, "bundle-"+temp)
		var rss int64
		syncDisks()
		pt.time("skopeo copy", func() {
			rss = max(rss, runRSS(t, "skopeo", "copy", "--src-tls-verify=false", "docker://"+ref, "oci:"+layout+":test"))
		})
		pt.time("umoci unpack", func() { rss = max(rss, runRSS(t, "umoci", "unpack", "--image", layout+":test", bundle)) })
		pt.time("mkfs.ext4 -d", func() {
			ext4 := filepath.Join(dir, "ref-"+temp+".ext4")
			f, err := os.Create(ext4)
			if err != nil {
				t.Fatal(err)
			}
			size, _ := dirSize(filepath.Join(bundle, "rootfs"))
			if err := f.Truncate(DefaultSize(size)); err != nil {
				t.Fatal(err)
			}
			f.Close()
			rss = max(rss, runRSS(t, "mkfs.ext4", "-q", "-F", "-d", filepath.Join(bundle, "rootfs"), ext4))
			_ = os.Remove(ext4)
		})
		_ = os.RemoveAll(bundle)
		refT[temp], refRSS[temp] = pt, rss
	}

	var b strings.Builder
	fmt.Fprintf(&b, "\n== %s (%s)\n", label, ref)
	for _, r := range runs {
		fmt.Fprintf(&b, "banger %-14s total %7.2fs  peak RSS %4d MiB  |", r.name, r.pt.total().Seconds(), r.rss>>20)
		for _, n := range r.pt.names {
			fmt.Fprintf(&b, " %s %.2fs", n, r.pt.durs[n].Seconds())
		}
		b.WriteString("\n")
	}
	for _, temp := range []string{"cold", "warm"} {
		pt := refT[temp]
		fmt.Fprintf(&b, "reference %-11s total %7.2fs  peak RSS %4d MiB  |", temp, pt.total().Seconds(), refRSS[temp]>>20)
		for _, n := range pt.names {
			fmt.Fprintf(&b, " %s %.2fs", n, pt.durs[n].Seconds())
		}
		b.WriteString("\n")
	}
	for _, r := range runs {
		temp := r.name[strings.LastIndexByte(r.name, ' ')+1:]
		fmt.Fprintf(&b, "ratio banger %s / reference %s: %.2fx\n", r.name, temp, r.pt.total().Seconds()/refT[temp].total().Seconds())
	}
	t.Log(b.String())
}

// dirSize sums the sizes of the regular files below dir, rounded to blocks.
func dirSize(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			info, err := d.Info()
			if err != nil {
				return err
			}
			n += roundUp(info.Size(), blockSize)
		}
		return nil
	})
	return n, err
}
