// Package network holds the end-to-end test of VM networking: two VMs at
// once get their own addresses and reach each other over the bridge.
package network

import (
	"context"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

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
	var list []api.VMSummary
	d.JSON(ctx, &list, "vm", "ls")
	if len(list) != 2 || list[0].State != model.VMRunning || list[1].State != model.VMRunning {
		t.Fatalf("vm ls: %+v", list)
	}
	d.MustCLI(ctx, "vm", "rm", "--force", "a", "b")
	e2etest.AssertNoVMResources(t, e, true)
}
