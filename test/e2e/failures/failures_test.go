// Package failures holds the end-to-end test of failed VMs: an unbootable
// kernel, and a VM monitor killed from outside.
package failures

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

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
	if vm.Runtime.Monitor.PID == 0 {
		t.Fatal("running VM has no pid")
	}
	if err := syscall.Kill(vm.Runtime.Monitor.PID, syscall.SIGKILL); err != nil {
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
