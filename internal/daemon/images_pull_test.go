package daemon_test

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/testutil"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

type tarEntry struct {
	name, body, link string
	typ              byte
	mode             int64
	uid              int
}

func layerOf(t *testing.T, entries []tarEntry) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		typ := e.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		h := &tar.Header{Name: e.name, Typeflag: typ, Mode: e.mode, Uid: e.uid, Linkname: e.link, ModTime: time.Unix(1, 0)}
		if typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if typ == tar.TypeReg {
			_, _ = tw.Write([]byte(e.body))
		}
	}
	_ = tw.Close()
	raw := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// pullFixture is a daemon plus an in-process OCI registry on 127.0.0.1.
type pullFixture struct {
	s      *daemontest.Started
	reg    string
	client *api.Client
}

func newPullFixture(t *testing.T) *pullFixture {
	t.Helper()
	testutil.RequiresTool(t, "mkfs.ext4", "debugfs", "e2fsck")
	reg := httptest.NewServer(registry.New())
	t.Cleanup(reg.Close)
	agent := filepath.Join(t.TempDir(), "banger-vsock-agent")
	if err := os.WriteFile(agent, []byte("#!/bin/sh\n# stand-in agent\n"), 0o755); err != nil { // #nosec G306 -- an executable
		t.Fatal(err)
	}
	s := daemontest.Start(t, func(c *config.Config) { c.AgentBinary = agent })
	return &pullFixture{s: s, reg: strings.TrimPrefix(reg.URL, "http://"), client: api.NewClient(s.Config.Socket)}
}

func (f *pullFixture) push(t *testing.T, repo string, layers ...v1.Layer) string {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(f.reg + "/" + repo + ":v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	return ref.String()
}

func (f *pullFixture) pull(ctx context.Context, req api.PullRequest) (model.Image, []progress.Event, error) {
	var img model.Image
	var mu sync.Mutex
	var evs []progress.Event
	err := f.client.Stream(ctx, "POST", "/images/pull", req, func(ev progress.Event) {
		mu.Lock()
		evs = append(evs, ev)
		mu.Unlock()
	}, &img)
	return img, evs, err
}

// leftovers lists what a pull may leave: image dirs, staging dirs and this
// daemon's scratch dirs.
func (f *pullFixture) leftovers(t *testing.T) []string {
	t.Helper()
	var out []string
	ents, _ := os.ReadDir(f.s.Config.ImagesDir())
	for _, e := range ents {
		out = append(out, "images/"+e.Name())
	}
	scratch, _ := os.ReadDir(f.s.Config.ScratchDir())
	for _, e := range scratch {
		out = append(out, "tmp/"+e.Name())
	}
	return out
}

// TestOCIPullThroughDaemon pulls a two-layer image from an in-process
// registry through the daemon: the record, the ext4, the owners and the
// progress phases; a second pull of the name conflicts unless forced; a
// hostile layer and a cancelled pull leave nothing behind; a catalog name
// without a catalog says so.
func TestOCIPullThroughDaemon(t *testing.T) {
	f := newPullFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	base := layerOf(t, []tarEntry{
		{name: "etc/", typ: tar.TypeDir, mode: 0o755},
		{name: "etc/shadow", body: "root:*:1::::::\n", mode: 0o640, uid: 0},
		{name: "usr/bin/sudo", body: "#!/bin/true\n", mode: 0o4755},
		{name: "home/dev/", typ: tar.TypeDir, mode: 0o755, uid: 1000},
		{name: "old", body: "gone soon"},
	})
	top := layerOf(t, []tarEntry{{name: ".wh.old", body: ""}, {name: "new", body: "hello"}})
	ref := f.push(t, "test/debian", base, top)

	img, evs, err := f.pull(ctx, api.PullRequest{Ref: ref})
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	if img.Name != "debian-v1" || img.Source != "oci" || !img.Managed || len(img.Layers) != 2 || img.Boot != nil {
		t.Fatalf("image record: %+v", img)
	}
	phases := map[string]bool{}
	for _, ev := range evs {
		phases[ev.Phase] = true
	}
	// The default builder is the direct one: scan, then mkfs (no staging
	// tree, no ownership pass).
	for _, p := range []string{"resolve", "download", "scan", "mkfs", "inject", "publish"} {
		if !phases[p] {
			t.Errorf("no %q progress event (got %v)", p, phases)
		}
	}
	if out, err := testutil.Run(ctx, "e2fsck", "-fn", img.RootFS); err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img.RootFS, err, out)
	}
	stat, err := testutil.Run(ctx, "debugfs", "-R", "stat /usr/bin/sudo", img.RootFS)
	if err != nil || !strings.Contains(stat, "Mode:  04755") || !strings.Contains(stat, "User:     0") {
		t.Errorf("sudo in the ext4: %v\n%s", err, stat)
	}
	ls, _ := testutil.Run(ctx, "debugfs", "-R", "ls -l /", img.RootFS)
	if strings.Contains(ls, " old") || !strings.Contains(ls, " new") {
		t.Errorf("whiteout not applied:\n%s", ls)
	}

	_, _, err = f.pull(ctx, api.PullRequest{Ref: ref})
	if api.CodeOf(err) != api.CodeConflict {
		t.Fatalf("second pull: %v, want a conflict", err)
	}
	img2, evs2, err := f.pull(ctx, api.PullRequest{Ref: ref, Force: true, Size: "1536M", Builder: "staging"})
	if err != nil || img2.Size != 1536<<20 || img2.ID == img.ID {
		t.Fatalf("pull --force --size 1536M --builder staging: %+v, %v", img2, err)
	}
	phases = map[string]bool{}
	for _, ev := range evs2 {
		phases[ev.Phase] = true
	}
	if !phases["flatten"] || !phases["ownership"] || phases["scan"] {
		t.Errorf("--builder staging phases %v, want flatten and ownership, no scan", phases)
	}
	if out, err := testutil.Run(ctx, "e2fsck", "-fn", img2.RootFS); err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img2.RootFS, err, out)
	}
	if _, _, err := f.pull(ctx, api.PullRequest{Ref: ref, Force: true, Builder: "fast"}); api.CodeOf(err) != api.CodeInvalid {
		t.Errorf("--builder fast: %v, want invalid", err)
	}
	if _, err := os.Stat(img.Dir); !os.IsNotExist(err) {
		t.Errorf("the replaced image's dir is still there: %v", err)
	}

	// A hostile layer: an error naming the entry; nothing published.
	evil := f.push(t, "test/evil", layerOf(t, []tarEntry{{name: "etc/x\n!touch /tmp/pwned", body: "x"}}))
	_, _, err = f.pull(ctx, api.PullRequest{Ref: evil})
	if api.CodeOf(err) != api.CodeInvalid || !strings.Contains(err.Error(), "layer 0") {
		t.Fatalf("hostile layer: %v, want invalid input naming the layer", err)
	}
	if left := f.leftovers(t); len(left) != 1 {
		t.Fatalf("after a refused pull: %v, want only the published image", left)
	}

	// Cancel mid-pull: nothing published, nothing left.
	big := f.push(t, "test/big", layerOf(t, bigEntries(3000)))
	cctx, ccancel := context.WithCancel(ctx)
	defer ccancel()
	err = f.client.Stream(cctx, "POST", "/images/pull", api.PullRequest{Ref: big, Name: "big"}, func(ev progress.Event) {
		if ev.Phase == "scan" || ev.Phase == "flatten" {
			ccancel() // Ctrl-C in the middle of the pull
		}
	}, nil)
	if api.CodeOf(err) != api.CodeCanceled {
		t.Fatalf("cancelled pull: %v, want canceled", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		left := f.leftovers(t)
		if len(left) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a cancelled pull left %v", left)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := f.s.D.Store().GetImage("big"); err == nil {
		t.Fatal("a cancelled pull was recorded")
	}

	_, _, err = f.pull(ctx, api.PullRequest{Ref: "debian-bookworm"})
	if api.CodeOf(err) != api.CodeInvalid || !strings.Contains(err.Error(), "catalog is not configured") {
		t.Fatalf("catalog name without a catalog: %v", err)
	}
}

func bigEntries(n int) []tarEntry {
	out := []tarEntry{{name: "d/", typ: tar.TypeDir, mode: 0o755}}
	for i := range n {
		out = append(out, tarEntry{name: "d/f" + strings.Repeat("x", i%50) + itoa(i), body: strings.Repeat("y", 2048), mode: 0o644})
	}
	return out
}

func itoa(i int) string {
	const digits = "0123456789"
	if i == 0 {
		return "0"
	}
	var b []byte
	for i > 0 {
		b = append([]byte{digits[i%10]}, b...)
		i /= 10
	}
	return string(b)
}
