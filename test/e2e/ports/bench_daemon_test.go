package ports

import (
	"context"
	"encoding/json"
	"net"
	"os/exec"
	"strconv"
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
// IP over the bridge. All traffic stays inside the test's namespace.
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
	mbs := make([]float64, len(paths))
	lat := make([]latencyResult, len(paths))
	for i, p := range paths {
		var r pullResult
		runJSON(t, e.NS.Cmd(tools.pfclient, "pull", p.blast, strconv.Itoa(benchBytes)), &r)
		mbs[i] = r.Bytes / 1e6 / r.Seconds
		runJSON(t, e.NS.Cmd(tools.pfclient, "latency", "http://"+p.web+"/index.html", strconv.Itoa(benchRequests)), &lat[i])
	}
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
