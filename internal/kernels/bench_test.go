package kernels_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/kernels/initramfs"
	"github.com/bangerdev/banger/internal/testutil"
)

// Benchmarks (see the package report):
//
//	go test ./internal/kernels -run '^$' -bench . -benchtime 3x
//
// BenchmarkGenerateInitramfs times initramfs generation from the Debian
// cloud kernel's modules tree; BenchmarkBootToMarker times QEMU (TCG) from
// start to the test root file system's marker line, with banger's
// initramfs and with a busybox-only one doing the same work.

func BenchmarkGenerateInitramfs(b *testing.B) {
	k := debianKernel(b)
	ib := initBinary(b)
	var info initramfs.Info
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var err error
		info, err = initramfs.Generate(context.Background(), io.Discard, initramfs.Options{ModulesDir: k.Modules.Path, InitBinary: ib})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(info.Size), "bytes")
	b.ReportMetric(float64(len(info.Modules)), "modules")
}

func BenchmarkBootToMarker(b *testing.B) {
	testutil.RequiresQEMU(b)
	testutil.RequiresVM(b)
	k := debianKernel(b)
	disk := testRootfs(b)
	busybox := buildBusyboxInitrd(b, k.Modules.Path, filepath.Join(b.TempDir(), "initrd-busybox"))
	// Boots alternate between the two initramfs so that load from other
	// work on the host hits both alike.
	variants := []struct{ name, initrd string }{{"banger-init", k.Initrd.Path}, {"busybox", busybox}}
	total := make([]time.Duration, len(variants))
	guest := make([]float64, len(variants))
	for i := 0; i < b.N; i++ {
		for j, v := range variants {
			res := boot(b, k.Kernel.Path, v.initrd, disk, bootCmdline, "BANGER-MARKER", 90*time.Second)
			if !strings.Contains(res.console, markerOK) {
				b.Fatalf("%s boot: no %q; console tail:\n%s", v.name, markerOK, tail(res.console, 30))
			}
			total[j] += res.markerAt
			guest[j] += guestUptime(res.console)
		}
	}
	for j, v := range variants {
		b.ReportMetric(float64(total[j].Milliseconds())/float64(b.N), v.name+"-ms-to-marker")
		b.ReportMetric(guest[j]*1000/float64(b.N), v.name+"-guest-ms")
		st, _ := os.Stat(v.initrd)
		b.ReportMetric(float64(st.Size()), v.name+"-initrd-bytes")
	}
}

// guestUptime is the guest's /proc/uptime the marker line reports, in s.
func guestUptime(console string) float64 {
	i := strings.Index(console, markerOK+" uptime=")
	if i < 0 {
		return 0
	}
	f := strings.Fields(console[i+len(markerOK+" uptime="):])
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// busyboxInit does what banger-init does, with busybox applets.
const busyboxInit = `#!/bin/busybox sh
bb=/bin/busybox
die() { echo "busybox-init: $*"; $bb poweroff -f; }
$bb mount -t proc proc /proc || die mount proc
$bb mount -t sysfs sysfs /sys || die mount sysfs
$bb mount -t devtmpfs devtmpfs /dev || die mount devtmpfs
for m in $($bb grep -v '^#' /etc/banger/modules); do
	$bb insmod "$m" || die "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
	i=$((i + 1))
	[ "$i" -gt 1000 ] && die "no /dev/vda"
	$bb usleep 10000
done
$bb mount -t ext4 -o ro /dev/vda /newroot || die mount root
for d in dev proc sys; do $bb mount --move /$d /newroot/$d || die "move /$d"; done
exec $bb switch_root /newroot /sbin/init
`

// buildBusyboxInitrd writes a gzip'd initramfs with static busybox, the
// script above as /init and the same modules banger's initramfs loads.
func buildBusyboxInitrd(b testing.TB, modulesDir, out string) string {
	b.Helper()
	testutil.RequiresTool(b, "busybox")
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		b.Fatalf("read /bin/busybox (install busybox-static): %v", err)
	}
	mods, err := initramfs.ResolveModules(modulesDir, initramfs.DefaultModules)
	if err != nil {
		b.Fatal(err)
	}
	version := filepath.Base(modulesDir)
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	cw := initramfs.NewWriter(zw)
	must := func(err error) {
		if err != nil {
			b.Fatal(err)
		}
	}
	for _, d := range []string{"bin", "dev", "proc", "sys", "newroot", "etc", "etc/banger"} {
		must(cw.Dir(d, 0o755))
	}
	must(cw.CharDev("dev/console", 0o600, 5, 1))
	must(cw.File("bin/busybox", 0o755, bb))
	must(cw.File("init", 0o755, []byte(busyboxInit)))
	dirs := map[string]bool{}
	var list strings.Builder
	for _, m := range mods {
		p := "lib/modules/" + version + "/" + m.Path
		var chain []string
		for d := filepath.Dir(p); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
			chain = append([]string{d}, chain...)
		}
		for _, d := range chain {
			must(cw.Dir(d, 0o755))
		}
		data, err := os.ReadFile(filepath.Join(modulesDir, m.Path))
		must(err)
		must(cw.File(p, 0o644, data))
		list.WriteString("/" + p + "\n")
	}
	must(cw.File(initramfs.ModulesListPath, 0o644, []byte(list.String())))
	must(cw.Close())
	must(zw.Close())
	must(os.WriteFile(out, buf.Bytes(), 0o644))
	return out
}
