package lifecycle

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// TestE2ETwoVMs runs two VMs at once: different IPs, and they reach each
// other over the bridge.
func TestE2ETwoVMs(t *testing.T) {
	e := e2etest.Setup(t, nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "a", "--memory", "768M")
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "b", "--memory", "768M")
	// Start both, then wait for both: the boots overlap.
	d.MustCLI(ctx, "vm", "start", "a")
	d.MustCLI(ctx, "vm", "start", "b")
	var a, b model.VM
	for _, n := range []string{"a", "b"} {
		d.MustCLI(ctx, "ssh", n, "--", "true")
	}
	d.JSON(ctx, &a, "vm", "inspect", "a")
	d.JSON(ctx, &b, "vm", "inspect", "b")
	if a.IP == "" || a.IP == b.IP {
		t.Fatalf("VM IPs %q and %q must differ", a.IP, b.IP)
	}
	d.MustCLI(ctx, "ssh", "a", "--", "ping", "-c", "2", "-W", "5", b.IP)
	d.MustCLI(ctx, "ssh", "b", "--", "ping", "-c", "2", "-W", "5", a.IP)
	var list []model.VMSummary
	d.JSON(ctx, &list, "vm", "ls")
	if len(list) != 2 || list[0].State != model.VMRunning || list[1].State != model.VMRunning {
		t.Fatalf("vm ls: %+v", list)
	}
	d.MustCLI(ctx, "vm", "rm", "--force", "a", "b")
	e2etest.AssertNoVMResources(t, e, true)
}

// TestE2EFailures: a kernel that cannot boot sends the VM to error, releases
// everything and keeps the console log; a VM monitor killed from outside is
// noticed and its VM stopped with its resources released.
func TestE2EFailures(t *testing.T) {
	e := e2etest.Setup(t, map[string]any{"healthy_timeout": "3m"})
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	// The cloud kernel without its initramfs has no virtio_blk: it panics
	// looking for the root device (panic=-1 + -no-reboot: QEMU exits).
	d.MustCLI(ctx, "kernel", "import", "no-initrd", "--kernel", e.Kernel.Kernel.Path)
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "bad", "--kernel-ref", "no-initrd")
	r := d.CLI(ctx, "vm", "start", "bad", "--wait")
	if r.Code == 0 {
		t.Fatalf("vm start of an unbootable kernel succeeded:\n%s", r.Stdout)
	}
	var vm model.VM
	d.JSON(ctx, &vm, "vm", "inspect", "bad")
	if vm.State != model.VMError || vm.Reason == "" || !vm.Runtime.Empty() {
		t.Fatalf("unbootable VM: state %s reason %q runtime %+v", vm.State, vm.Reason, vm.Runtime)
	}
	logs := d.MustCLI(ctx, "vm", "logs", "bad")
	if !strings.Contains(logs, "Kernel panic") && !strings.Contains(logs, "VFS") {
		t.Errorf("console log of the failed boot was not kept:\n%s", e2etest.Tail(logs, 20))
	}
	e2etest.AssertNoVMResources(t, e, false)
	d.MustCLI(ctx, "vm", "rm", "bad")

	// A monitor killed from outside.
	d.MustCLI(ctx, "vm", "run", "--image", e.Image, "--name", "victim", "--memory", "768M")
	vm = model.VM{}
	d.JSON(ctx, &vm, "vm", "inspect", "victim")
	if vm.Runtime.PID == 0 {
		t.Fatal("running VM has no pid")
	}
	if err := syscall.Kill(vm.Runtime.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		vm = model.VM{}
		d.JSON(ctx, &vm, "vm", "inspect", "victim")
		if vm.State == model.VMStopped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM whose monitor was killed is still %s after 30s", vm.State)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if !vm.Runtime.Empty() || len(vm.Recovery.Removed) == 0 {
		t.Fatalf("killed VM: runtime %+v, cleanup removed %v", vm.Runtime, vm.Recovery.Removed)
	}
	e2etest.AssertNoVMResources(t, e, false)
	// It starts again.
	d.MustCLI(ctx, "vm", "start", "victim", "--wait")
	d.MustCLI(ctx, "vm", "rm", "--force", "victim")
	e2etest.AssertNoVMResources(t, e, true)
}
