package daemon_test

import (
	"archive/tar"
	"context"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
)

// TestForcePullKeepsImageOfVMs: pull --force over an image that a VM was
// made from replaces the name, but the old image (record, rootfs and
// every file the VM boots from) stays, under a ".replaced-" name, so the
// VM keeps booting what it was made from; an image no VM uses goes.
func TestForcePullKeepsImageOfVMs(t *testing.T) {
	f := newPullFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ref := f.push(t, "test/base", layerOf(t, []tarEntry{{name: "etc/", typ: tar.TypeDir, mode: 0o755}, {name: "etc/v", body: "1"}}))
	img, _, err := f.pull(ctx, api.PullRequest{Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	st := f.s.D.Store()
	vm := &model.VM{ID: "0123456789abcdef01234567", Name: "made-from-v1", Image: img.Name, ImageID: img.ID, State: model.VMStopped, Created: time.Now()}
	if err := st.CreateVM(vm, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	img2, _, err := f.pull(ctx, api.PullRequest{Ref: ref, Force: true})
	if err != nil || img2.ID == img.ID {
		t.Fatalf("pull --force: %+v, %v", img2, err)
	}
	if got, err := st.GetImage(img.Name); err != nil || got.ID != img2.ID {
		t.Fatalf("the name %q after pull --force: %+v, %v; want the new image", img.Name, got, err)
	}
	kept, err := st.GetImage(img.ID)
	if err != nil {
		t.Fatalf("the image the VM was made from is gone after pull --force: %v", err)
	}
	if want := img.Name + ".replaced-" + img.ID[:8]; kept.Name != want {
		t.Errorf("kept image named %q, want %q", kept.Name, want)
	}
	if _, err := os.Stat(kept.RootFS); err != nil {
		t.Fatalf("the kept image's rootfs: %v", err)
	}

	// No VM uses img2: replacing it removes it.
	img3, _, err := f.pull(ctx, api.PullRequest{Ref: ref, Force: true})
	if err != nil || img3.ID == img2.ID {
		t.Fatalf("second pull --force: %+v, %v", img3, err)
	}
	if _, err := st.GetImage(img2.ID); err == nil {
		t.Error("an image no VM used was kept after being replaced")
	}
	if _, err := os.Stat(img2.Dir); !os.IsNotExist(err) {
		t.Errorf("the replaced, unused image's dir is still there: %v", err)
	}
}
