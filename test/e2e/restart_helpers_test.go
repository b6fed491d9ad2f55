package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Helpers of the restart and crash tests: a daemon whose VMs run on
// banger-fake-firecracker (real processes serving the Firecracker API and
// banger's real guest agent over the vsock socket; no guest boots), and
// the leak checks run after every restart.

// fakeEnv is a namespace, a registry holding a tiny image, and a daemon
// that runs VMs on the fake Firecracker with the Debian cloud kernel
// imported and the tiny image pulled.
func fakeEnv(t *testing.T, extra map[string]any) *env {
	t.Helper()
	testutil.RequiresRoot(t)
	testutil.RequiresTool(t, "mkfs.ext4", "debugfs", "nft")
	deb := testutil.DebianKernelDeb(t)
	ns := newNetNS(t)
	reg := startRegistry(t, ns)
	ref := reg.push(t, ns, miniLayout(t), "banger/mini")
	bins := binaries(t)
	agentRoot := t.TempDir()
	cfg := map[string]any{
		"vmm":                     "firecracker",
		"firecracker_binary":      filepath.Join(bins, "banger-fake-firecracker"),
		"firecracker_without_kvm": true,
		"firecracker_args":        []string{"--agent-root", agentRoot},
		"ready_check":             "agent",
		"disk_driver":             "copy",
		"healthy_timeout":         "20s",
	}
	for k, v := range extra {
		cfg[k] = v
	}
	d := newDaemon(t, ns, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "kernel", "import", "deb-cloud", "--deb", deb)
	d.MustCLI(ctx, "image", "pull", ref, "--name", "mini", "--kernel-ref", "deb-cloud")
	return &env{ns: ns, reg: reg, d: d, imgName: "mini"}
}

// miniLayout is an OCI layout holding testutil.MiniRootfsTar, tagged "test".
func miniLayout(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	tarPath := testutil.MiniRootfsTar(t, dir, "restart-test")
	layer, err := tarball.LayerFromFile(tarPath, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	if img, err = mutate.ConfigFile(img, mustConfig(img)); err != nil {
		t.Fatal(err)
	}
	img = mutate.ConfigMediaType(mutate.MediaType(img, types.OCIManifestSchema1), types.OCIConfigJSON)
	out := filepath.Join(dir, "layout")
	p, err := layout.Write(out, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "test"})); err != nil {
		t.Fatal(err)
	}
	return out
}

// withStore stops the daemon (SIGTERM: VMs keep running), opens its store,
// checks it, calls fn with the VM records, and starts the daemon again.
func withStore(t *testing.T, d *Daemon, fn func(st *store.Store, vms []model.VM)) {
	t.Helper()
	d.Stop()
	st, err := store.Open(filepath.Join(d.StateDir(), "banger.db"), 5*time.Second)
	if err != nil {
		t.Fatalf("open the store of the stopped daemon: %v", err)
	}
	if err := st.Check(); err != nil {
		t.Errorf("store inconsistent: %v", err)
	}
	vms, err := st.ListVMs(nil)
	if err != nil {
		t.Fatal(err)
	}
	if fn != nil {
		fn(st, vms)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	d.Start()
}

// waitSettled waits until no VM is starting or stopping (a re-adopted
// starting VM finishes its boot waiter), up to timeout.
func waitSettled(ctx context.Context, t *testing.T, d *Daemon, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var vms []struct {
			Name  string        `json:"name"`
			State model.VMState `json:"state"`
		}
		r := d.CLI(ctx, "vm", "ls", "-o", "json")
		if r.Code != 0 {
			t.Fatalf("banger vm ls: exit %d: %s", r.Code, r.Stderr)
		}
		if err := json.Unmarshal([]byte(r.Stdout), &vms); err != nil {
			t.Fatalf("banger vm ls -o json: %v", err)
		}
		busy := ""
		for _, v := range vms {
			if v.State == model.VMStarting || v.State == model.VMStopping {
				busy = v.Name + " is " + string(v.State)
			}
		}
		if busy == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("after %s: %s", timeout, busy)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// leaks compares the host with the VM records (read from the store of the
// stopped daemon) and returns every disagreement: a VM in a state other
// than created, stopped or running; a running VM without its live, verified
// monitor; any tap, monitor process, runtime dir, VM dir, loop device, dm
// device, nftables table, staging or scratch dir, or half-copied disk that
// no running VM accounts for.
func leaks(t *testing.T, e *env, vms []model.VM) []string {
	t.Helper()
	d := e.d
	var out []string
	running := map[string]model.VM{}
	ids := map[string]bool{}
	for _, vm := range vms {
		ids[vm.ID] = true
		switch vm.State {
		case model.VMCreated, model.VMStopped:
			if !vm.Runtime.Empty() {
				out = append(out, fmt.Sprintf("VM %s is %s but holds runtime %+v", vm.Name, vm.State, vm.Runtime))
			}
		case model.VMRunning:
			running[vm.ID] = vm
			h := vmm.Handle{PID: vm.Runtime.PID, PIDStart: vm.Runtime.PIDStart, BootID: vm.Runtime.BootID, Cmdline: vm.Runtime.Cmdline}
			if alive, err := vmm.Alive(h); !alive || err != nil {
				out = append(out, fmt.Sprintf("VM %s is running but its monitor pid %d is not the recorded process (%v)", vm.Name, h.PID, err))
			}
		default:
			out = append(out, fmt.Sprintf("VM %s is %s (%s)", vm.Name, vm.State, vm.Reason))
		}
	}
	// Taps in the namespace.
	var wantTaps, gotTaps []string
	for _, vm := range running {
		wantTaps = append(wantTaps, vm.Runtime.Tap)
	}
	for _, l := range strings.Split(e.ns.mustRun(t, "ip", "-o", "link", "show"), "\n") {
		f := strings.Fields(l)
		if len(f) > 1 && strings.HasPrefix(f[1], "bgr-") {
			gotTaps = append(gotTaps, strings.TrimSuffix(strings.SplitN(f[1], "@", 2)[0], ":"))
		}
	}
	if !sameSet(wantTaps, gotTaps) {
		out = append(out, fmt.Sprintf("taps %v, want those of the running VMs %v", gotTaps, wantTaps))
	}
	// Monitor processes in the namespace.
	var wantPIDs, gotPIDs []string
	for _, vm := range running {
		wantPIDs = append(wantPIDs, itoa(vm.Runtime.PID))
	}
	for _, pid := range e.ns.pids() {
		comm, _ := os.ReadFile("/proc/" + itoa(pid) + "/comm")
		c := strings.TrimSpace(string(comm))
		if strings.HasPrefix(c, "qemu") || strings.HasPrefix(c, "banger-fake-fi") || strings.HasPrefix(c, "firecracker") {
			gotPIDs = append(gotPIDs, itoa(pid))
		}
	}
	if !sameSet(wantPIDs, gotPIDs) {
		out = append(out, fmt.Sprintf("monitor processes %v, want those of the running VMs %v", gotPIDs, wantPIDs))
	}
	// Runtime dirs: exactly the running VMs'.
	var wantRT, gotRT []string
	for id := range running {
		wantRT = append(wantRT, id)
	}
	if ents, err := os.ReadDir(filepath.Join(d.RuntimeDir(), "vms")); err == nil {
		for _, e := range ents {
			gotRT = append(gotRT, e.Name())
		}
	}
	if !sameSet(wantRT, gotRT) {
		out = append(out, fmt.Sprintf("runtime dirs %v, want the running VMs' %v", gotRT, wantRT))
	}
	// VM dirs: only known VMs', no half-copied disks.
	if ents, err := os.ReadDir(filepath.Join(d.StateDir(), "vms")); err == nil {
		for _, e := range ents {
			if !ids[e.Name()] {
				out = append(out, "VM dir of no VM: "+e.Name())
			}
		}
	}
	partials, _ := filepath.Glob(filepath.Join(d.StateDir(), "vms", "*", "*.partial"))
	for _, p := range partials {
		out = append(out, "half-copied disk "+p)
	}
	// Loop devices backed by the state dir: none (the copy driver uses no
	// loops; dm-snapshot's would belong to running VMs' records).
	var wantLoops []string
	for _, vm := range running {
		for _, l := range vm.Runtime.Loops {
			wantLoops = append(wantLoops, l.BackingFile)
		}
	}
	var gotLoops []string
	backings, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, b := range backings {
		raw, _ := os.ReadFile(b)
		f := strings.TrimSuffix(strings.TrimSpace(string(raw)), " (deleted)")
		if strings.HasPrefix(f, d.StateDir()+"/") {
			gotLoops = append(gotLoops, f)
		}
	}
	if !sameSet(wantLoops, gotLoops) {
		out = append(out, fmt.Sprintf("loops backed by %v, want %v", gotLoops, wantLoops))
	}
	// dm devices of our VMs.
	for id := range ids {
		if _, err := os.Stat("/dev/mapper/banger-" + id); err == nil {
			if _, ok := running[id]; !ok {
				out = append(out, "dm device banger-"+id+" of a VM that does not run")
			}
		}
	}
	// nftables: the banger table exists only while a VM runs.
	tables := e.ns.mustRun(t, "nft", "list", "tables")
	hasTable := slices.Contains(strings.Split(strings.TrimSpace(tables), "\n"), "table ip banger")
	if hasTable && len(running) == 0 {
		out = append(out, "nftables table banger left with no VM running")
	}
	// Staging and scratch dirs.
	stagings, _ := filepath.Glob(filepath.Join(d.StateDir(), "images", "*.staging"))
	out = append(out, prefixAll("staging dir ", stagings)...)
	scratches, _ := filepath.Glob(filepath.Join(d.StateDir(), "tmp", "*"))
	out = append(out, prefixAll("pull scratch dir ", scratches)...)
	return out
}

func prefixAll(p string, ss []string) []string {
	out := make([]string, 0, len(ss))
	for _, s := range ss {
		out = append(out, p+s)
	}
	return out
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	sort.Strings(a)
	sort.Strings(b)
	return slices.Equal(a, b)
}

// daemonLog returns the daemon's log so far.
func daemonLog(t *testing.T, d *Daemon) string {
	t.Helper()
	b, err := os.ReadFile(d.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// startWithEnv starts the daemon with extra environment variables (the
// harness's daemon inherits the test's environment).
func startWithEnv(d *Daemon, kv map[string]string) {
	for k, v := range kv {
		_ = os.Setenv(k, v)
	}
	defer func() {
		for k := range kv {
			_ = os.Unsetenv(k)
		}
	}()
	d.Start()
}
