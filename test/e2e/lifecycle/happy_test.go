package lifecycle

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// TestE2EHappyPath: pull, run, ssh, persist across stop/start, remove, and
// nothing is left behind.
func TestE2EHappyPath(t *testing.T) {
	e := e2etest.Setup(t, nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	var img model.Image
	d.JSON(ctx, &img, "image", "inspect", e.Image)
	if img.Boot == nil || img.Kernel != "deb-cloud" {
		t.Fatalf("image has no staged kernel: %+v", img)
	}

	start := time.Now()
	d.MustCLI(ctx, "vm", "run", "--image", e.Image, "--name", "e2e", "--memory", "1G", "--cpus", "2")
	t.Logf("vm run to ready: %s", time.Since(start).Round(100*time.Millisecond))

	var vm model.VM
	d.JSON(ctx, &vm, "vm", "inspect", "e2e")
	if vm.State != model.VMRunning || vm.VMM != "qemu" || vm.IP == "" || vm.HostKey == "" {
		t.Fatalf("VM after run: state %s vmm %s ip %q hostkey %q", vm.State, vm.VMM, vm.IP, vm.HostKey)
	}

	out := d.MustCLI(ctx, "ssh", "e2e", "--", "uname", "-r")
	if got := strings.TrimSpace(out); got != e.Kernel.Version {
		t.Fatalf("uname -r in the guest = %q, want the imported kernel %q", got, e.Kernel.Version)
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
	t.Logf("graceful stop took %s; console tail:\n%s", time.Since(stopStart).Round(100*time.Millisecond), e2etest.Tail(d.MustCLI(ctx, "vm", "logs", "e2e"), 15))
	vm = model.VM{}
	d.JSON(ctx, &vm, "vm", "inspect", "e2e")
	if vm.State != model.VMStopped || !vm.Runtime.Empty() {
		t.Fatalf("after stop: state %s runtime %+v", vm.State, vm.Runtime)
	}
	e2etest.AssertNoVMResources(t, e, false)

	d.MustCLI(ctx, "vm", "start", "e2e", "--wait")
	out = d.MustCLI(ctx, "ssh", "e2e", "--", "cat", "/root/marker")
	if strings.TrimSpace(out) != "persisted" {
		t.Fatalf("file written before stop reads %q after start", out)
	}
	logs := d.MustCLI(ctx, "vm", "logs", "e2e")
	if strings.Count(logs, "banger-network: done") < 2 {
		t.Errorf("console log lacks the network unit's line of both boots:\n%s", e2etest.Tail(logs, 20))
	}

	d.MustCLI(ctx, "vm", "rm", "--force", "e2e")
	e2etest.AssertNoVMResources(t, e, true)
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
