package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/vmm"
)

// BenchmarkVMListSocket measures GET /v1/vms through the real Unix socket
// with 1,000 VM records in the store, and reports p50 and p99.
func BenchmarkVMListSocket(b *testing.B) {
	s := daemontest.Start(b, nil)
	st := s.D.Store()
	for i := range 1000 {
		vm := &model.VM{ID: fmt.Sprintf("id-%04d", i), Name: fmt.Sprintf("vm-%04d", i), Image: "debian", State: model.VMRunning,
			VMM: "qemu", DiskDriver: "copy", CPUs: 2, MemoryMiB: 1024, Created: time.Now(),
			Runtime: model.Runtime{Monitor: vmm.Handle{PID: 1000 + i}, Tap: netctl.TapRef{Name: "bgr-" + strconv.Itoa(i)}, RuntimeDir: "/run/banger/vms/x",
				Disk: blockdev.Disk{Loops: []model.LoopDev{{Device: "/dev/loop1", BackingFile: "/var/lib/banger/images/x/rootfs.ext4"}}}}}
		if err := st.CreateVM(vm, netip.Prefix{}); err != nil {
			b.Fatal(err)
		}
	}
	c := api.NewClient(s.Config.Socket)
	ctx := context.Background()
	var roundTrip, withDecode []time.Duration
	rounds := max(b.N, 500)
	b.ResetTimer()
	for range rounds {
		// The API round trip: request sent, whole answer received.
		start := time.Now()
		body, err := c.Raw(ctx, "GET", "/vms")
		if err != nil {
			b.Fatal(err)
		}
		raw, err := io.ReadAll(body)
		body.Close()
		if err != nil {
			b.Fatal(err)
		}
		roundTrip = append(roundTrip, time.Since(start))
		// What `banger vm ls` does on top: decode the answer into structs.
		var vms []api.VMSummary
		if err := json.Unmarshal(raw, &vms); err != nil {
			b.Fatal(err)
		}
		withDecode = append(withDecode, time.Since(start))
		if len(vms) != 1000 {
			b.Fatalf("got %d VMs", len(vms))
		}
	}
	b.StopTimer()
	pct := func(lat []time.Duration, q float64) float64 {
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		return float64(lat[int(q*float64(len(lat)-1))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(roundTrip, 0.50), "p50-ms")
	b.ReportMetric(pct(roundTrip, 0.99), "p99-ms")
	b.ReportMetric(pct(withDecode, 0.50), "decoded-p50-ms")
	b.ReportMetric(pct(withDecode, 0.99), "decoded-p99-ms")
	b.ReportMetric(0, "ns/op")
	b.Logf("vm ls with 1000 records over %d requests: round trip p50 %.2f ms, p99 %.2f ms; with the CLI's JSON decode p50 %.2f ms, p99 %.2f ms",
		rounds, pct(roundTrip, 0.5), pct(roundTrip, 0.99), pct(withDecode, 0.5), pct(withDecode, 0.99))
}

// BenchmarkDaemonIdleRSS builds the real banger binary, starts the daemon,
// lets it settle and reports its resident set size.
func BenchmarkDaemonIdleRSS(b *testing.B) {
	dir := b.TempDir()
	bin := filepath.Join(dir, "banger")
	if out, err := exec.Command("go", "build", "-ldflags", "-s -w", "-o", bin, ".").CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "daemon", "--state-dir", filepath.Join(dir, "state"), "--cache-dir", filepath.Join(dir, "cache"), "--runtime-dir", filepath.Join(dir, "run"))
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	sock := filepath.Join(dir, "run", "banger.sock")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("daemon did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// A few requests, then idle.
	c := api.NewClient(sock)
	for range 10 {
		_ = c.Do(context.Background(), "GET", "/vms", nil, nil)
	}
	time.Sleep(3 * time.Second)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	var rssKB float64
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			rssKB, _ = strconv.ParseFloat(f[1], 64)
		}
	}
	b.ReportMetric(rssKB/1024, "idle-RSS-MiB")
	b.ReportMetric(0, "ns/op")
	b.Logf("daemon idle RSS: %.1f MiB", rssKB/1024)
}
