package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/testutil"
)

// env is the shared setup of the VM tests: a namespace, a registry holding
// the Debian test image, a daemon with the Debian cloud kernel imported and
// the image pulled.
type env struct {
	ns      *NetNS
	reg     *Registry
	d       *Daemon
	kernel  model.Kernel
	imgName string
}

func setup(t *testing.T, daemonCfg map[string]any) *env {
	t.Helper()
	testutil.RequiresVM(t)
	testutil.RequiresTool(t, "ssh", "mkfs.ext4", "debugfs")
	deb := testutil.DebianKernelDeb(t)
	layoutDir := debianLayout(t, "", nil)
	ns := newNetNS(t)
	reg := startRegistry(t, ns)
	ref := reg.push(t, ns, layoutDir, "banger/debian")
	d := newDaemon(t, ns, daemonCfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	d.MustCLI(ctx, "kernel", "import", "deb-cloud", "--deb", deb)
	var k model.Kernel
	d.JSON(ctx, &k, "kernel", "inspect", "deb-cloud")
	d.MustCLI(ctx, "image", "pull", ref, "--name", "debian-test", "--kernel-ref", "deb-cloud")
	return &env{ns: ns, reg: reg, d: d, kernel: k, imgName: "debian-test"}
}

// TestE2EHappyPath: pull, run, ssh, persist across stop/start, remove, and
// nothing is left behind.
func TestE2EHappyPath(t *testing.T) {
	e := setup(t, nil)
	d := e.d
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	var img model.Image
	d.JSON(ctx, &img, "image", "inspect", e.imgName)
	if img.Boot == nil || img.Kernel != "deb-cloud" {
		t.Fatalf("image has no staged kernel: %+v", img)
	}

	start := time.Now()
	d.MustCLI(ctx, "vm", "run", "--image", e.imgName, "--name", "e2e", "--memory", "1G", "--cpus", "2")
	t.Logf("vm run to ready: %s", time.Since(start).Round(100*time.Millisecond))

	var vm model.VM
	d.JSON(ctx, &vm, "vm", "inspect", "e2e")
	if vm.State != model.VMRunning || vm.VMM != "qemu" || vm.IP == "" || vm.HostKey == "" {
		t.Fatalf("VM after run: state %s vmm %s ip %q hostkey %q", vm.State, vm.VMM, vm.IP, vm.HostKey)
	}

	out := d.MustCLI(ctx, "ssh", "e2e", "--", "uname", "-r")
	if got := strings.TrimSpace(out); got != e.kernel.Version {
		t.Fatalf("uname -r in the guest = %q, want the imported kernel %q", got, e.kernel.Version)
	}
	// The exit status of the remote command comes back.
	if r := d.CLI(ctx, "ssh", "e2e", "--", "exit", "7"); r.Code != 7 {
		t.Fatalf("ssh -- exit 7: got exit %d (%s)", r.Code, r.Stderr)
	}
	// The agent channel works and sudo stayed setuid root.
	out = d.MustCLI(ctx, "ssh", "e2e", "--", "stat", "-c", "%a:%U", "/usr/bin/sudo")
	if strings.TrimSpace(out) != "4755:root" {
		t.Fatalf("/usr/bin/sudo in the guest is %q, want 4755:root", out)
	}

	d.MustCLI(ctx, "ssh", "e2e", "--", "sh", "-c", "'echo persisted > /root/marker && sync'")
	stopStart := time.Now()
	d.MustCLI(ctx, "vm", "stop", "e2e")
	t.Logf("graceful stop took %s; console tail:\n%s", time.Since(stopStart).Round(100*time.Millisecond), tail(d.MustCLI(ctx, "vm", "logs", "e2e"), 15))
	vm = model.VM{}
	d.JSON(ctx, &vm, "vm", "inspect", "e2e")
	if vm.State != model.VMStopped || !vm.Runtime.Empty() {
		t.Fatalf("after stop: state %s runtime %+v", vm.State, vm.Runtime)
	}
	assertNoVMResources(t, e, false)

	d.MustCLI(ctx, "vm", "start", "e2e", "--wait")
	out = d.MustCLI(ctx, "ssh", "e2e", "--", "cat", "/root/marker")
	if strings.TrimSpace(out) != "persisted" {
		t.Fatalf("file written before stop reads %q after start", out)
	}
	logs := d.MustCLI(ctx, "vm", "logs", "e2e")
	if strings.Count(logs, "banger-network: done") < 2 {
		t.Errorf("console log lacks the network unit's line of both boots:\n%s", tail(logs, 20))
	}

	d.MustCLI(ctx, "vm", "rm", "--force", "e2e")
	assertNoVMResources(t, e, true)
	d.Stop()
	st, err := store.Open(filepath.Join(d.StateDir(), "banger.db"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	leases, _ := st.Leases()
	if len(leases) != 0 {
		t.Fatalf("leases left after vm rm: %v", leases)
	}
	if err := st.Check(); err != nil {
		t.Fatalf("store inconsistent: %v", err)
	}
}

// assertNoVMResources checks that no VM holds a tap, loop device, monitor
// process or runtime file; with gone, that no VM dir or NAT rule is left.
func assertNoVMResources(t *testing.T, e *env, gone bool) {
	t.Helper()
	links := e.ns.mustRun(t, "ip", "-o", "link", "show")
	if strings.Contains(links, "bgr-") {
		t.Errorf("taps left in the namespace:\n%s", links)
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, l := range loops {
		b, _ := os.ReadFile(l)
		if strings.HasPrefix(strings.TrimSpace(string(b)), e.d.StateDir()) {
			t.Errorf("loop device %s still backed by %s", l, b)
		}
	}
	for _, pid := range e.ns.pids() {
		comm, _ := os.ReadFile("/proc/" + itoa(pid) + "/comm")
		if strings.HasPrefix(string(comm), "qemu") || strings.HasPrefix(string(comm), "firecracker") {
			t.Errorf("VM monitor process %d (%s) left running", pid, strings.TrimSpace(string(comm)))
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(e.d.RuntimeDir(), "vms")); len(ents) != 0 {
		t.Errorf("runtime files left: %v", ents)
	}
	if gone {
		if ents, _ := os.ReadDir(filepath.Join(e.d.StateDir(), "vms")); len(ents) != 0 {
			t.Errorf("VM dirs left: %v", ents)
		}
		rules := e.ns.mustRun(t, "nft", "list", "ruleset")
		if strings.Contains(rules, "masquerade") {
			t.Errorf("NAT rules left with no VM:\n%s", rules)
		}
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
