package imagepull

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerdev/banger/internal/guestabi"
)

// dumpFile reads a file out of the image with debugfs dump.
func dumpFile(t *testing.T, img, p string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "dump")
	var s script
	s.add("dump", qpath(p), qpath(out))
	if _, err := runDebugfs(context.Background(), img, &s, false); err != nil {
		t.Fatalf("dump %s: %v", p, err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func fakeAgent(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "banger-vsock-agent")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestInjectGuestAgents(t *testing.T) {
	requireE2fsprogs(t)
	// A minimal image: /etc and /usr exist (the ones from the image keep
	// their owner), everything else InjectGuestAgents must create.
	staging := stageFiles(t, map[string]string{"etc/os-release": "ID=debian\n"}, "usr/bin")
	img := mkfsStaging(t, staging)
	ctx := context.Background()
	if err := ApplyOwnership(ctx, img, Metadata{"usr": {Type: TypeDir, UID: 5, Mode: 0o755}}); err != nil {
		t.Fatal(err)
	}
	agent := fakeAgent(t, "\x7fELF agent v1")
	if err := InjectGuestAgents(ctx, img, GuestAssets{AgentBinary: agent}); err != nil {
		t.Fatalf("InjectGuestAgents: %v", err)
	}
	checkInjected(t, img, "\x7fELF agent v1")

	// Again, with a new agent: replaced, not duplicated or failed.
	agent2 := fakeAgent(t, "\x7fELF agent v2, longer than the first one")
	cfg := &guestabi.ImageConfig{Entrypoint: []string{"/app"}, Cmd: []string{"--serve"}, Env: []string{"A=1"}, User: "app:staff", WorkingDir: "/srv", ExposedPorts: []string{"80/tcp"}}
	if err := InjectGuestAgents(ctx, img, GuestAssets{AgentBinary: agent2, Config: cfg}); err != nil {
		t.Fatalf("second InjectGuestAgents: %v", err)
	}
	checkInjected(t, img, "\x7fELF agent v2, longer than the first one")
	var got guestabi.ImageConfig
	if err := json.Unmarshal(dumpFile(t, img, guestabi.ImageConfigFile), &got); err != nil {
		t.Fatalf("image config in the guest: %v", err)
	}
	if diff := cmp.Diff(*cfg, got); diff != "" {
		t.Errorf("image config in the guest (-want +got):\n%s", diff)
	}
	if got := statPaths(t, img, "/usr")["/usr"]; got.UID != 5 {
		t.Errorf("/usr: %+v, an existing directory must keep its owner", got)
	}
}

func checkInjected(t *testing.T, img, agentContent string) {
	t.Helper()
	want := map[string]inodeInfo{
		GuestAgentPath:                               {Type: "regular", Mode: 0o755},
		GuestFirstBootScript:                         {Type: "regular", Mode: 0o755},
		GuestModulesLoadFile:                         {Type: "regular", Mode: 0o644},
		GuestFirstBootPending:                        {Type: "regular", Mode: 0o644},
		GuestFirstBootStatus:                         {Type: "regular", Mode: 0o644},
		GuestUnitDir + "/banger-network.service":     {Type: "regular", Mode: 0o644},
		GuestUnitDir + "/banger-first-boot.service":  {Type: "regular", Mode: 0o644},
		GuestUnitDir + "/banger-vsock-agent.service": {Type: "regular", Mode: 0o644},
		"/usr/local":                                 {Type: "directory", Mode: 0o755},
		"/usr/local/bin":                             {Type: "directory", Mode: 0o755},
		GuestLibDir:                                  {Type: "directory", Mode: 0o755},
		GuestWantsDir:                                {Type: "directory", Mode: 0o755},
		"/etc/modules-load.d":                        {Type: "directory", Mode: 0o755},
		"/var/lib":                                   {Type: "directory", Mode: 0o755},
		GuestStateDir:                                {Type: "directory", Mode: 0o755},
	}
	for _, u := range GuestUnits {
		want[GuestWantsDir+"/"+u] = inodeInfo{Type: "symlink", Mode: 0o777, Target: GuestUnitDir + "/" + u}
	}
	want[guestabi.InitPath] = inodeInfo{Type: "symlink", Mode: 0o777, Target: GuestAgentPath}
	checkInodes(t, img, want)

	if got := dumpFile(t, img, GuestAgentPath); string(got) != agentContent {
		t.Errorf("agent content %q, want %q", got, agentContent)
	}
	for guest, asset := range map[string]string{
		GuestFirstBootScript:                         "first-boot.sh",
		GuestModulesLoadFile:                         "banger-vsock.conf",
		GuestUnitDir + "/banger-vsock-agent.service": "banger-vsock-agent.service",
	} {
		wantContent, err := assetFS.ReadFile("assets/" + asset)
		if err != nil {
			t.Fatal(err)
		}
		if got := dumpFile(t, img, guest); !bytes.Equal(got, wantContent) {
			t.Errorf("%s differs from assets/%s", guest, asset)
		}
	}
	if got := dumpFile(t, img, GuestFirstBootStatus); string(got) != "pending\n" {
		t.Errorf("first-boot status %q", got)
	}
	mods := string(dumpFile(t, img, GuestModulesLoadFile))
	for _, m := range []string{"\nvmw_vsock_virtio_transport\n", "\nvirtio_console\n"} {
		if !bytes.Contains([]byte(mods), []byte(m)) {
			t.Errorf("modules-load file lacks %q:\n%s", m, mods)
		}
	}
	e2fsckClean(t, img)
}

func TestInjectGuestAgentsRefusesBadLayout(t *testing.T) {
	requireE2fsprogs(t)
	agent := fakeAgent(t, "agent")
	// /usr/local/lib is a symlink out of the expected tree.
	s1 := stageFiles(t, nil, "usr/local", "opt/lib")
	if err := os.Symlink("/opt/lib", filepath.Join(s1, "usr/local/lib")); err != nil {
		t.Fatal(err)
	}
	// The marker path is a directory.
	s2 := stageFiles(t, nil, "var/lib/banger/first-boot-pending")
	for name, staging := range map[string]string{"symlinked dir": s1, "dir at file path": s2} {
		img := mkfsStaging(t, staging)
		if err := InjectGuestAgents(context.Background(), img, GuestAssets{AgentBinary: agent}); !errors.Is(err, ErrGuestLayout) {
			t.Errorf("%s: InjectGuestAgents = %v, want ErrGuestLayout", name, err)
		}
	}
	img := mkfsStaging(t, stageFiles(t, nil, "etc"))
	if err := InjectGuestAgents(context.Background(), img, GuestAssets{}); err == nil {
		t.Errorf("InjectGuestAgents without an agent binary succeeded")
	}
	if err := InjectGuestAgents(context.Background(), img, GuestAssets{AgentBinary: filepath.Dir(agent)}); err == nil {
		t.Errorf("InjectGuestAgents with a directory as agent binary succeeded")
	}
}

func TestInjectSSHDReady(t *testing.T) {
	requireE2fsprogs(t)
	img := mkfsStaging(t, stageFiles(t, map[string]string{"etc/os-release": "ID=debian\n"}))
	if err := InjectGuestAgents(context.Background(), img, GuestAssets{AgentBinary: fakeAgent(t, "agent"), SSHDReady: true}); err != nil {
		t.Fatal(err)
	}
	if got := dumpFile(t, img, GuestFirstBootStatus); string(got) != "done\n" {
		t.Errorf("first-boot status %q, want done (sshd is ready in the image)", got)
	}
	if got := statPaths(t, img, GuestFirstBootPending)[GuestFirstBootPending]; got.Type != "" {
		t.Errorf("first-boot marker %+v written for an image whose sshd is ready", got)
	}
}

// TestRefreshGuestAgent: RefreshGuestAgent puts this banger's guest program,
// units, first-boot script and links back over an image whose agent is
// old and whose units and init link are gone, and leaves the image's state
// alone (first-boot marker and status, run config, other files); the
// result is clean by e2fsck -fn.
func TestRefreshGuestAgent(t *testing.T) {
	requireE2fsprogs(t)
	ctx := context.Background()
	img := mkfsStaging(t, stageFiles(t, map[string]string{"etc/os-release": "ID=debian\n"}))
	cfg := &guestabi.ImageConfig{Entrypoint: []string{"/app"}, Env: []string{"A=1"}}
	if err := InjectGuestAgents(ctx, img, GuestAssets{AgentBinary: fakeAgent(t, "\x7fELF an old agent, before streams"), Config: cfg}); err != nil {
		t.Fatal(err)
	}
	// The image's life since: first boot failed once, a unit and the PID 1
	// link were removed.
	var s script
	s.add("rm", qpath(GuestFirstBootStatus))
	s.add("rm", qpath(GuestUnitDir+"/banger-vsock-agent.service"))
	s.add("rm", qpath(guestabi.InitPath))
	status := filepath.Join(t.TempDir(), "status")
	if err := os.WriteFile(status, []byte("failed\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.add("cd", qpath(path.Dir(GuestFirstBootStatus)))
	s.add("write", qpath(status), qbase(path.Base(GuestFirstBootStatus)))
	if _, err := runDebugfs(ctx, img, &s, true); err != nil {
		t.Fatal(err)
	}
	configBefore := dumpFile(t, img, guestabi.ImageConfigFile)

	if err := RefreshGuestAgent(ctx, img, fakeAgent(t, "\x7fELF this banger's agent")); err != nil {
		t.Fatalf("RefreshGuestAgent: %v", err)
	}
	if got := dumpFile(t, img, GuestAgentPath); string(got) != "\x7fELF this banger's agent" {
		t.Errorf("agent after refresh: %q", got)
	}
	want, _ := assetFS.ReadFile("assets/banger-vsock-agent.service")
	if got := dumpFile(t, img, GuestUnitDir+"/banger-vsock-agent.service"); !bytes.Equal(got, want) {
		t.Errorf("agent unit after refresh: %q", got)
	}
	checkInodes(t, img, map[string]inodeInfo{
		guestabi.InitPath:     {Type: "symlink", Mode: 0o777, Target: GuestAgentPath},
		GuestAgentPath:        {Type: "regular", Mode: 0o755},
		GuestFirstBootPending: {Type: "regular", Mode: 0o644},
	})
	if got := dumpFile(t, img, GuestFirstBootStatus); string(got) != "failed\n" {
		t.Errorf("first-boot status after refresh: %q, want the image's own (failed)", got)
	}
	if got := dumpFile(t, img, guestabi.ImageConfigFile); !bytes.Equal(got, configBefore) {
		t.Errorf("run config changed by refresh: %q, was %q", got, configBefore)
	}
	if got := dumpFile(t, img, "/etc/os-release"); string(got) != "ID=debian\n" {
		t.Errorf("an image file changed by refresh: %q", got)
	}
	if err := CheckExt4(ctx, img); err != nil {
		t.Errorf("CheckExt4 after refresh: %v", err)
	}
	// CheckExt4 fails on a damaged file system.
	bad := mkfsStaging(t, stageFiles(t, map[string]string{"f": "x"}))
	var d script
	d.add("clri", qpath("/f"))
	if _, err := runDebugfs(ctx, bad, &d, true); err != nil {
		t.Fatal(err)
	}
	if err := CheckExt4(ctx, bad); err == nil {
		t.Error("CheckExt4 passed a file system with a cleared inode still linked")
	}
	if err := RefreshGuestAgent(ctx, img, ""); err == nil {
		t.Error("RefreshGuestAgent without an agent binary succeeded")
	}
}
