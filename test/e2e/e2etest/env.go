package e2etest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/internal/vmm"
)

// Env is the usual setup of an end-to-end test: a namespace, a registry in
// it holding a test image, and a daemon with a kernel imported and the
// image pulled.
type Env struct {
	NS     *NetNS
	Reg    *Registry
	D      *Daemon
	Kernel model.Kernel // the imported Debian cloud kernel, "deb-cloud"
	Image  string       // name of the pulled image
}

// For returns a copy of e whose daemon reports to t (see Daemon.For), for a
// subtest sharing its parent's Env.
func (e *Env) For(t testing.TB) *Env {
	c := *e
	c.D = e.D.For(t)
	return &c
}

// Setup is the Env of the QEMU tests: the Debian test image (systemd,
// sshd) pulled as "debian-test", with the Debian cloud kernel imported as
// "deb-cloud". daemonCfg is merged into the daemon's config.
func Setup(t testing.TB, daemonCfg map[string]any) *Env {
	t.Helper()
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "ssh", "mkfs.ext4", "debugfs")
	layoutDir := DebianLayout(t, "", nil)
	return SetupWith(t, daemonCfg, "debian-test", func(ns *NetNS, reg *Registry) string {
		return reg.Push(t, ns, layoutDir, "banger/debian")
	})
}

// SetupWith is Setup with a caller-made image: push puts it into the
// registry and returns its reference; it is pulled as imageName.
func SetupWith(t testing.TB, daemonCfg map[string]any, imageName string, push func(ns *NetNS, reg *Registry) string) *Env {
	t.Helper()
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "ssh", "mkfs.ext4", "debugfs")
	deb := testutil.DebianKernelDeb(t)
	ns := NewNetNS(t)
	reg := StartRegistry(t, ns)
	ref := push(ns, reg)
	d := NewDaemon(t, ns, daemonCfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "kernel", "import", "deb-cloud", "--deb", deb)
	var k model.Kernel
	d.JSON(ctx, &k, "kernel", "inspect", "deb-cloud")
	d.MustCLI(ctx, "image", "pull", ref, "--name", imageName, "--kernel-ref", "deb-cloud")
	return &Env{NS: ns, Reg: reg, D: d, Kernel: k, Image: imageName}
}

// FakeEnv is the Env of the restart and crash tests: VMs run on
// banger-fake-firecracker (real processes serving the Firecracker API and
// banger's real guest agent over the vsock socket; no guest boots), with
// the Debian cloud kernel imported and a tiny image (MiniLayout) pulled as
// "mini". extra is merged into the daemon's config.
func FakeEnv(t testing.TB, extra map[string]any) *Env {
	t.Helper()
	testutil.RequiresRoot(t)
	return FakeEnvIn(t, NewNetNS(t), extra)
}

// FakeEnvIn is FakeEnv in an existing namespace.
func FakeEnvIn(t testing.TB, ns *NetNS, extra map[string]any) *Env {
	t.Helper()
	testutil.RequiresRoot(t)
	testutil.RequiresTool(t, "mkfs.ext4", "debugfs", "nft")
	deb := testutil.DebianKernelDeb(t)
	reg := StartRegistry(t, ns)
	ref := reg.Push(t, ns, MiniLayout(t), "banger/mini")
	bins := Binaries(t)
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
	d := NewDaemon(t, ns, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "kernel", "import", "deb-cloud", "--deb", deb)
	d.MustCLI(ctx, "image", "pull", ref, "--name", "mini", "--kernel-ref", "deb-cloud")
	return &Env{NS: ns, Reg: reg, D: d, Image: "mini"}
}

// Inspect returns the VM as `vm inspect -o json` shows it (the API view;
// the daemon runs as root here, so it carries the runtime and recovery).
func Inspect(ctx context.Context, t testing.TB, d *Daemon, name string) api.VM {
	t.Helper()
	var vm api.VM
	d.JSON(ctx, &vm, "vm", "inspect", name)
	return vm
}

// AssertNoVMResources checks that no VM holds a tap, loop device, monitor
// process or runtime file; with gone, that no VM dir or NAT rule is left.
func AssertNoVMResources(t testing.TB, e *Env, gone bool) {
	t.Helper()
	links := e.NS.MustRun(t, "ip", "-o", "link", "show")
	if strings.Contains(links, "bgr-") {
		t.Errorf("taps left in the namespace:\n%s", links)
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, l := range loops {
		b, _ := os.ReadFile(l)
		if strings.HasPrefix(strings.TrimSpace(string(b)), e.D.StateDir()) {
			t.Errorf("loop device %s still backed by %s", l, b)
		}
	}
	for _, pid := range e.NS.PIDs() {
		comm, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
		if strings.HasPrefix(string(comm), "qemu") || strings.HasPrefix(string(comm), "firecracker") {
			t.Errorf("VM monitor process %d (%s) left running", pid, strings.TrimSpace(string(comm)))
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(e.D.RuntimeDir(), "vms")); len(ents) != 0 {
		t.Errorf("runtime files left: %v", ents)
	}
	if gone {
		if ents, _ := os.ReadDir(filepath.Join(e.D.StateDir(), "vms")); len(ents) != 0 {
			t.Errorf("VM dirs left: %v", ents)
		}
		rules := e.NS.MustRun(t, "nft", "list", "ruleset")
		if strings.Contains(rules, "masquerade") {
			t.Errorf("NAT rules left with no VM:\n%s", rules)
		}
	}
}

// WithStore stops the daemon (SIGTERM: VMs keep running), opens its store,
// checks it, calls fn with the VM records, and starts the daemon again.
func WithStore(t testing.TB, d *Daemon, fn func(st *store.Store, vms []model.VM)) {
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

// WaitSettled waits until no VM is starting or stopping (a re-adopted
// starting VM finishes its boot waiter), up to timeout.
func WaitSettled(ctx context.Context, t testing.TB, d *Daemon, timeout time.Duration) {
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

// Leaks compares the host with the VM records (read from the store of the
// stopped daemon) and returns every disagreement: a VM in a state other
// than created, stopped or running; a running VM without its live, verified
// monitor; any tap, monitor process, runtime dir, VM dir, loop device, dm
// device, nftables table, staging or scratch dir, or half-copied disk that
// no running VM accounts for.
func Leaks(t testing.TB, e *Env, vms []model.VM) []string {
	t.Helper()
	d := e.D
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
			h := vmm.Handle{PID: vm.Runtime.Monitor.PID, PIDStart: vm.Runtime.Monitor.PIDStart, BootID: vm.Runtime.Monitor.BootID, Cmdline: vm.Runtime.Monitor.Cmdline}
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
		wantTaps = append(wantTaps, vm.Runtime.Tap.Name)
	}
	for _, l := range strings.Split(e.NS.MustRun(t, "ip", "-o", "link", "show"), "\n") {
		f := strings.Fields(l)
		if len(f) > 1 && strings.HasPrefix(f[1], "bgr-") {
			gotTaps = append(gotTaps, strings.TrimSuffix(strings.SplitN(f[1], "@", 2)[0], ":"))
		}
	}
	if !SameSet(wantTaps, gotTaps) {
		out = append(out, fmt.Sprintf("taps %v, want those of the running VMs %v", gotTaps, wantTaps))
	}
	// Monitor processes in the namespace.
	var wantPIDs, gotPIDs []string
	for _, vm := range running {
		wantPIDs = append(wantPIDs, strconv.Itoa(vm.Runtime.Monitor.PID))
	}
	for _, pid := range e.NS.PIDs() {
		comm, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
		c := strings.TrimSpace(string(comm))
		if strings.HasPrefix(c, "qemu") || strings.HasPrefix(c, "banger-fake-fi") || strings.HasPrefix(c, "firecracker") {
			gotPIDs = append(gotPIDs, strconv.Itoa(pid))
		}
	}
	if !SameSet(wantPIDs, gotPIDs) {
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
	if !SameSet(wantRT, gotRT) {
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
	unsynced, _ := filepath.Glob(filepath.Join(d.StateDir(), "vms", "*", "*.unsynced"))
	for _, p := range unsynced {
		out = append(out, "unflushed disk copy "+p)
	}
	// Loop devices backed by the state dir: none (the copy driver uses no
	// loops; dm-snapshot's would belong to running VMs' records).
	var wantLoops []string
	for _, vm := range running {
		for _, l := range vm.Runtime.Disk.Loops {
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
	if !SameSet(wantLoops, gotLoops) {
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
	tables := e.NS.MustRun(t, "nft", "list", "tables")
	hasTable := slices.Contains(strings.Split(strings.TrimSpace(tables), "\n"), "table ip banger")
	if hasTable && len(running) == 0 {
		out = append(out, "nftables table banger left with no VM running")
	}
	// Staging and scratch dirs.
	stagings, _ := filepath.Glob(filepath.Join(d.StateDir(), "images", "*.staging"))
	for _, s := range stagings {
		out = append(out, "staging dir "+s)
	}
	scratches, _ := filepath.Glob(filepath.Join(d.StateDir(), "tmp", "*"))
	for _, s := range scratches {
		out = append(out, "pull scratch dir "+s)
	}
	return out
}

// SameSet reports whether a and b hold the same strings, in any order.
func SameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	sort.Strings(a)
	sort.Strings(b)
	return slices.Equal(a, b)
}
