package ports

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// benchBytes is the throughput benchmark's transfer.
const benchBytes = 1 << 30

// benchRequests is the latency benchmark's request count per path.
const benchRequests = 200

type pullResult struct {
	Bytes   float64 `json:"bytes"`
	Seconds float64 `json:"seconds"`
}

type latencyResult struct {
	P50 int64 `json:"p50_us"`
	P99 int64 `json:"p99_us"`
}

// runJSON runs pfclient in the namespace and decodes what it prints.
func runJSON(t *testing.T, cmd *exec.Cmd, v any) {
	t.Helper()
	out, err := e2etest.Output(cmd)
	if err != nil {
		t.Fatalf("%v: %v: %s", cmd.Args, err, out)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("%v: %v: %s", cmd.Args, err, out)
	}
}

// benchPorts is the benchmark, on the VM of the daemon test: 1 GiB
// from the guest's blast and small HTTP requests to the guest's httpd
// (8081, on every guest address), through the published port (daemon →
// agent channel → guest), through banger port-forward (CLI → daemon →
// agent channel), and, as the reference in the same run, to the guest's
// IP over the bridge. All traffic stays inside the test's namespace. Each
// path is measured in the same run, halves interleaved.
func benchPorts(ctx context.Context, t *testing.T, e *e2etest.Env, tools webTools, pub9000, pub8081 string) {
	var vm api.VM // (e2etest.Inspect decodes a model.VM, whose mounts are not the API's strings)
	e.D.JSON(ctx, &vm, "vm", "inspect", "web")
	if vm.IP == "" {
		t.Fatal("the VM has no IP: no bridge reference")
	}
	pf := startPortForward(ctx, t, e, "web", "0:9000", "0:8081")
	paths := []struct {
		name       string
		blast, web string
	}{
		{"bridge (guest IP)", net.JoinHostPort(vm.IP, "9000"), net.JoinHostPort(vm.IP, "8081")},
		{"published port", pub9000, pub8081},
		{"port-forward", pf.addr(0), pf.addr(1)},
	}
	// Warm each path (first connections, page cache), then measure.
	for _, p := range paths {
		var r pullResult
		runJSON(t, e.NS.Cmd(tools.pfclient, "pull", p.blast, strconv.Itoa(16<<20)), &r)
	}
	// 1 GiB per path in two halves, the second half in the reverse order,
	// so a load that changes during the run weighs on every path alike.
	var bytes, secs [3]float64
	lat := make([]latencyResult, len(paths))
	for round := range 2 {
		for k := range paths {
			i := k
			if round == 1 {
				i = len(paths) - 1 - k
			}
			var r pullResult
			runJSON(t, e.NS.Cmd(tools.pfclient, "pull", paths[i].blast, strconv.Itoa(benchBytes/2)), &r)
			bytes[i] += r.Bytes
			secs[i] += r.Seconds
			if round == 0 {
				runJSON(t, e.NS.Cmd(tools.pfclient, "latency", "http://"+paths[i].web+"/index.html", strconv.Itoa(benchRequests)), &lat[i])
			}
		}
	}
	mbs := make([]float64, len(paths))
	for i := range paths {
		mbs[i] = bytes[i] / 1e6 / secs[i]
	}
	load, _ := os.ReadFile("/proc/loadavg")
	t.Logf("BENCH load average at the end: %s", strings.TrimSpace(string(load)))
	for i, p := range paths {
		t.Logf("BENCH ports, QEMU TCG busybox guest, %s: 1 GiB at %.1f MB/s (%.2fx the bridge); %d small HTTP requests p50 %v p99 %v (%.2fx / %.2fx the bridge's)",
			p.name, mbs[i], mbs[i]/mbs[0], benchRequests,
			time.Duration(lat[i].P50)*time.Microsecond, time.Duration(lat[i].P99)*time.Microsecond,
			float64(lat[i].P50)/float64(lat[0].P50), float64(lat[i].P99)/float64(lat[0].P99))
	}
	if mbs[1] < 0.5*mbs[0] {
		t.Logf("BENCH the published port is below the goal of 0.5x the bridge's throughput")
	}
	if code := pf.interrupt(t); code != 0 {
		t.Errorf("port-forward after SIGINT: exit %d", code)
	}
}
