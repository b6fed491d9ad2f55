package daemon_test

import (
	"archive/tar"
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/testutil"
)

// TestRefreshAgentThroughDaemon: an image whose guest agent is old (and
// whose agent unit is gone) gets this banger's agent and unit back from
// POST /v1/images/{name}/refresh-agent, with its own files and first-boot
// state kept and a clean e2fsck; a second uid (65534) is refused and
// changes nothing; the owner (65533) and root may; the VM made from the
// old image keeps it; a canceled refresh and an unknown image leave
// nothing behind.
func TestRefreshAgentThroughDaemon(t *testing.T) {
	testutil.RequiresRoot(t)
	f := newPullFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	owner := clientAs(t, f.s.Config.Socket, 65533, 65533)
	stranger := clientAs(t, f.s.Config.Socket, 65534, 65534)
	ref := f.push(t, "test/app", layerOf(t, []tarEntry{{name: "etc/", typ: tar.TypeDir, mode: 0o755}, {name: "etc/app.conf", body: "mine"}}))
	var img model.Image
	if err := owner.Stream(ctx, "POST", "/images/pull", api.PullRequest{Ref: ref, Name: "app"}, nil, &img); err != nil {
		t.Fatalf("pull as uid 65533: %v", err)
	}
	if img.OwnerUID != 65533 {
		t.Fatalf("image owner %d, want 65533", img.OwnerUID)
	}
	// Make it an image from an older banger: an old agent, no agent unit.
	oldAgent := filepath.Join(t.TempDir(), "old-agent")
	if err := os.WriteFile(oldAgent, []byte("#!/bin/sh\n# an agent from before the stream services\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := imagepull.RefreshGuestAgent(ctx, img.RootFS, oldAgent); err != nil {
		t.Fatal(err)
	}
	if out, err := testutil.Run(ctx, "debugfs", "-w", "-R", "rm "+imagepull.GuestUnitDir+"/banger-vsock-agent.service", img.RootFS); err != nil {
		t.Fatalf("debugfs rm: %v\n%s", err, out)
	}
	st := f.s.D.Store()
	vm := &model.VM{ID: "0123456789abcdef01234568", Name: "made-before", Image: img.Name, ImageID: img.ID, State: model.VMStopped, Created: time.Now(), OwnerUID: 65533}
	if err := st.CreateVM(vm, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	dump := func(rootfs, p string) string {
		t.Helper()
		out, err := exec.CommandContext(ctx, "debugfs", "-R", "cat "+p, rootfs).Output() //nolint:gosec // test
		if err != nil {
			t.Fatalf("debugfs cat %s: %v", p, err)
		}
		return string(out)
	}
	refresh := func(c *api.Client, name string) (model.Image, []progress.Event, error) {
		var got model.Image
		var evs []progress.Event
		err := c.Stream(ctx, "POST", "/images/"+name+"/refresh-agent", nil, func(ev progress.Event) { evs = append(evs, ev) }, &got)
		return got, evs, err
	}

	if _, _, err := refresh(stranger, "app"); api.CodeOf(err) != api.CodeForbidden || !strings.Contains(err.Error(), "only its owner or root may refresh its agent") {
		t.Errorf("refresh-agent by uid 65534: %v; want forbidden", err)
	}
	if got, _ := st.GetImage("app"); got.ID != img.ID {
		t.Errorf("a refused refresh changed the image: %s, was %s", got.ID, img.ID)
	}

	newImg, evs, err := refresh(owner, "app")
	if err != nil {
		t.Fatalf("refresh-agent by the owner: %v", err)
	}
	if newImg.ID == img.ID || newImg.Name != "app" || newImg.OwnerUID != 65533 || newImg.Ref != img.Ref {
		t.Errorf("refreshed image record: %+v (old %+v)", newImg, img)
	}
	phases := map[string]bool{}
	for _, ev := range evs {
		phases[ev.Phase] = true
	}
	for _, p := range []string{"copy", "inject", "check", "publish"} {
		if !phases[p] {
			t.Errorf("no %q progress event (got %v)", p, phases)
		}
	}
	want, _ := os.ReadFile(f.s.Config.AgentBinary)
	if got := dump(newImg.RootFS, imagepull.GuestAgentPath); got != string(want) {
		t.Errorf("agent in the refreshed image: %q, want this banger's %q", got, want)
	}
	if got := dump(newImg.RootFS, imagepull.GuestUnitDir+"/banger-vsock-agent.service"); !strings.Contains(got, "banger-vsock-agent") {
		t.Errorf("agent unit in the refreshed image: %q", got)
	}
	if got := dump(newImg.RootFS, "/etc/app.conf"); got != "mine" {
		t.Errorf("the image's own file after refresh: %q", got)
	}
	if got := dump(newImg.RootFS, imagepull.GuestFirstBootStatus); strings.TrimSpace(got) != "pending" {
		t.Errorf("first-boot status after refresh: %q", got)
	}
	if out, err := testutil.Run(ctx, "e2fsck", "-fn", newImg.RootFS); err != nil {
		t.Errorf("e2fsck -fn of the refreshed image: %v\n%s", err, out)
	}
	kept, err := st.GetImage(img.ID)
	if err != nil || kept.Name != "app.replaced-"+img.ID[:8] {
		t.Fatalf("the old image the VM was made from: %+v, %v", kept, err)
	}
	if got := dump(kept.RootFS, imagepull.GuestAgentPath); !strings.Contains(got, "before the stream services") {
		t.Errorf("the kept old image was changed: agent %q", got)
	}

	// Root may too; no VM uses the previous one, so it goes.
	rootImg, _, err := refresh(f.client, "app")
	if err != nil {
		t.Fatalf("refresh-agent by root: %v", err)
	}
	if _, err := st.GetImage(newImg.ID); err == nil {
		t.Error("an image no VM used was kept after its refresh")
	}
	if _, err := os.Stat(newImg.Dir); !os.IsNotExist(err) {
		t.Errorf("the replaced, unused image's dir: %v", err)
	}

	// Canceled after its first event: nothing published, nothing left.
	cctx, ccancel := context.WithCancel(ctx)
	var got model.Image
	err = f.client.Stream(cctx, "POST", "/images/app/refresh-agent", nil, func(progress.Event) { ccancel() }, &got)
	ccancel()
	if err == nil {
		t.Fatal("a canceled refresh-agent succeeded")
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		left := f.leftovers(t)
		staging := false
		for _, l := range left {
			staging = staging || strings.HasSuffix(l, ".staging")
		}
		if !staging {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a canceled refresh left %v", left)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if cur, _ := st.GetImage("app"); cur.ID != rootImg.ID {
		t.Errorf("a canceled refresh changed the image: %s, was %s", cur.ID, rootImg.ID)
	}
	if _, _, err := refresh(f.client, "nope"); api.CodeOf(err) != api.CodeNotFound {
		t.Errorf("refresh-agent of an unknown image: %v; want not found", err)
	}
}
