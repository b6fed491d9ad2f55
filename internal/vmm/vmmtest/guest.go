package vmmtest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
)

// ReadyLine is what the test guest's /init prints on the console once it
// watches the ACPI power button (so system_powerdown will be honoured).
const ReadyLine = "banger-test-guest: ready"

// TickPrefix starts the console lines of the test guest's counter, which
// counts seconds in memory from boot: "banger-test-guest: tick 7".
const TickPrefix = "banger-test-guest: tick "

// DiskTickPrefix starts the test guest's tick records on its disk: tick n
// is written, and synced, at byte 64*n before it is printed.
const DiskTickPrefix = "banger-disk-tick "

// DiskTicks returns the tick numbers found on a test guest's disk.
func DiskTicks(disk string) []int {
	b, _ := os.ReadFile(disk) //nolint:gosec // test disk
	var ticks []int
	for n := 1; 64*n+64 <= len(b); n++ {
		rec := string(bytes.TrimRight(b[64*n:64*n+64], "\x00"))
		if v, ok := strings.CutPrefix(strings.TrimSpace(rec), DiskTickPrefix); ok {
			if got, err := strconv.Atoi(v); err == nil && got == n {
				ticks = append(ticks, n)
			}
		}
	}
	return ticks
}

// Ticks returns the counter values on a console log, in order.
func Ticks(consoleLog string) []int {
	b, _ := os.ReadFile(consoleLog) //nolint:gosec // test log
	var ticks []int
	for _, line := range strings.Split(string(b), "\n") {
		if i := strings.Index(line, TickPrefix); i >= 0 {
			if n, err := strconv.Atoi(strings.TrimSpace(line[i+len(TickPrefix):])); err == nil {
				ticks = append(ticks, n)
			}
		}
	}
	return ticks
}

// TicksContinue is a Config.Continued check for the test guest: the
// restored guest's first tick comes after the last one the saved guest
// printed, so its memory (the counter) came from the snapshot.
func TicksContinue(t *testing.T, saved, restored vmm.Spec) {
	t.Helper()
	before := Ticks(saved.ConsoleLog)
	if len(before) == 0 {
		t.Fatalf("the saved guest printed no %q lines", TickPrefix)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		after := Ticks(restored.ConsoleLog)
		if len(after) > 0 {
			last := before[len(before)-1]
			t.Logf("counter: saved guest printed up to %d, restored guest went on with %v", last, after)
			if after[0] <= 1 || after[0] < before[0] {
				t.Errorf("restored guest counts %v: it started over (saved guest reached %d)", after, last)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restored guest printed no tick in 30 s:\n%s", tail(restored.ConsoleLog))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// DebianKernel returns the vmlinuz and the modules directory of the cached
// Debian cloud kernel package, extracted once with dpkg-deb -x into the test
// cache.
func DebianKernel(t testing.TB) (vmlinuz, modules string) {
	t.Helper()
	testutil.RequiresTool(t, "dpkg-deb")
	deb := testutil.DebianKernelDeb(t)
	dir := filepath.Join(testutil.CacheDir(), "kernel-x", strings.TrimSuffix(filepath.Base(deb), ".deb"))
	if _, err := os.Stat(filepath.Join(dir, ".done")); err != nil {
		tmp, err := os.MkdirTemp(filepath.Dir(deb), ".extract-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(tmp)
		if out, err := exec.Command("dpkg-deb", "-x", deb, tmp).CombinedOutput(); err != nil {
			t.Fatalf("dpkg-deb -x %s: %v\n%s", deb, err, out)
		}
		if err := os.WriteFile(filepath.Join(tmp, ".done"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
			t.Fatal(err)
		}
		// Another test binary may have won the race: keep its copy.
		if err := os.Rename(tmp, dir); err != nil {
			if _, serr := os.Stat(filepath.Join(dir, ".done")); serr != nil {
				t.Fatalf("install extracted kernel: %v", err)
			}
		}
	}
	k, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*"))
	m, _ := filepath.Glob(filepath.Join(dir, "lib", "modules", "*"))
	if len(k) != 1 || len(m) != 1 {
		t.Fatalf("kernel package %s: found kernels %v and module dirs %v, want one of each", deb, k, m)
	}
	return k[0], m[0]
}

// guestInit is the test guest's /init: mount the basics, load the ACPI
// button driver, and power off when the power button is pressed. Reading
// one input_event (24 bytes on x86-64) from the button's evdev node is the
// whole of "ACPI handling".
const guestInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /lib/evdev.ko
insmod /lib/button.ko
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
	insmod /lib/$m.ko || echo "banger-test-guest: insmod $m failed"
done
[ -b /dev/vda ] || echo "banger-test-guest: no /dev/vda"
# A counter in memory, for the snapshot tests: a restored guest goes on
# counting from where the saved one was. Each tick is also written, synced,
# to its own 64-byte slot of the disk (when there is one), so a test sees
# which ticks reached the disk.
( n=0; while :; do
	n=$((n + 1))
	[ -b /dev/vda ] && echo "` + DiskTickPrefix + `$n" | dd of=/dev/vda bs=64 seek=$n conv=fsync 2>/dev/null
	echo "` + TickPrefix + `$n"
	sleep 1
done ) &
dev=
i=0
while [ -z "$dev" ] && [ $i -lt 100 ]; do
	for e in /sys/class/input/event*; do
		if grep -q "Power Button" "$e/device/name" 2>/dev/null; then
			dev=/dev/input/${e##*/}
		fi
	done
	i=$((i + 1))
	[ -z "$dev" ] && sleep 0.1
done
if [ -z "$dev" ]; then
	echo "banger-test-guest: no power button"
	exec sleep 100000
fi
echo "` + ReadyLine + ` ($dev)"
dd if="$dev" of=/dev/null bs=24 count=1 2>/dev/null
echo "banger-test-guest: power button, powering off"
poweroff -f
`

// BusyboxInitramfs builds a newc initramfs holding the static busybox, the
// evdev and ACPI button modules of the given modules directory, and an
// /init that powers off on the ACPI power button.
func BusyboxInitramfs(t testing.TB, modules string) string {
	t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		testutil.Missing(t, testutil.TierTools, "busybox not found in PATH (apt-get install busybox-static)")
	}
	if out, _ := exec.Command("file", "-L", bb).Output(); len(out) > 0 && !bytes.Contains(out, []byte("statically linked")) {
		testutil.Missing(t, testutil.TierTools, bb+" is not statically linked (apt-get install busybox-static)")
	}
	read := func(p string) []byte {
		b, err := os.ReadFile(p) //nolint:gosec // test fixture inputs
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var w cpioWriter
	for _, d := range []string{"bin", "dev", "proc", "sys", "lib"} {
		w.dir(d)
	}
	w.file("bin/busybox", 0o755, read(bb))
	w.file("init", 0o755, []byte(guestInit))
	w.file("lib/evdev.ko", 0o644, read(filepath.Join(modules, "kernel/drivers/input/evdev.ko")))
	w.file("lib/button.ko", 0o644, read(filepath.Join(modules, "kernel/drivers/acpi/button.ko")))
	for _, m := range []string{"virtio/virtio", "virtio/virtio_ring", "virtio/virtio_pci_legacy_dev", "virtio/virtio_pci_modern_dev", "virtio/virtio_pci"} {
		w.file("lib/"+filepath.Base(m)+".ko", 0o644, read(filepath.Join(modules, "kernel/drivers", m+".ko")))
	}
	w.file("lib/virtio_blk.ko", 0o644, read(filepath.Join(modules, "kernel/drivers/block/virtio_blk.ko")))
	out := filepath.Join(t.TempDir(), "initramfs.cpio")
	if err := os.WriteFile(out, w.finish(), 0o600); err != nil {
		t.Fatal(err)
	}
	return out
}

// cpioWriter writes the "newc" cpio format the kernel unpacks.
type cpioWriter struct {
	buf bytes.Buffer
	ino int
}

func (w *cpioWriter) header(name string, mode uint32, size int) {
	w.ino++
	fmt.Fprintf(&w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

func (w *cpioWriter) dir(name string) { w.header(name, 0o040755, 0) }

func (w *cpioWriter) file(name string, perm uint32, data []byte) {
	w.header(name, 0o100000|perm, len(data))
	w.buf.Write(data)
	w.pad()
}

func (w *cpioWriter) finish() []byte {
	w.header("TRAILER!!!", 0, 0)
	return w.buf.Bytes()
}
