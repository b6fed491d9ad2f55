package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/daemon/daemontest"
	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/testutil"
)

// TestImageCatalogCLI lists a file:// catalog, pulls its entry through
// `banger image pull NAME` and lists it again as pulled.
func TestImageCatalogCLI(t *testing.T) {
	testutil.RequiresTool(t, "mkfs.ext4", "debugfs")
	work := t.TempDir()
	agent := filepath.Join(work, "banger-vsock-agent")
	if err := os.WriteFile(agent, []byte("#!/bin/sh\n"), 0o755); err != nil { // #nosec G306 -- an executable
		t.Fatal(err)
	}
	dir := filepath.Join(work, "catalog")
	if _, err := imagecat.BuildFromTar(context.Background(), imagecat.BuildOptions{
		RootfsTar: testutil.MiniRootfsTar(t, work, "cli"), Name: "debian-bookworm", Description: "Debian 12 for the CLI test",
		AgentBinary: agent, OutDir: dir, Level: zstd.SpeedFastest,
	}); err != nil {
		t.Fatal(err)
	}
	s := daemontest.Start(t, func(c *cfgT) {
		c.ImageCatalog = "file://" + filepath.Join(dir, imagecat.IndexFile)
		c.AgentBinary = agent
	})
	out, errOut, code := runCLI(t, s.Config.Socket, "image", "catalog")
	if code != 0 || !strings.Contains(out, "debian-bookworm") || !strings.Contains(out, "Debian 12 for the CLI test") || !strings.Contains(out, "debian 12") {
		t.Fatalf("banger image catalog: exit %d\n%s%s", code, out, errOut)
	}
	if line := lineWith(out, "debian-bookworm"); !strings.Contains(line, " - ") {
		t.Errorf("entry not pulled yet, but its line is %q", line)
	}
	if out, errOut, code := runCLI(t, s.Config.Socket, "image", "pull", "debian-bookworm"); code != 0 || !strings.Contains(out, "pulled debian-bookworm") {
		t.Fatalf("banger image pull debian-bookworm: exit %d\n%s%s", code, out, errOut)
	}
	out, _, _ = runCLI(t, s.Config.Socket, "image", "catalog")
	if line := lineWith(out, "debian-bookworm"); !strings.Contains(line, "yes (debian-bookworm)") {
		t.Errorf("after the pull the line is %q, want it marked yes (debian-bookworm)", line)
	}
	if _, errOut, code := runCLI(t, s.Config.Socket, "image", "pull", "debian-bookworm"); code != exitConflict || !strings.Contains(errOut, "--force") {
		t.Errorf("second pull: exit %d, want %d with a hint at --force: %s", code, exitConflict, errOut)
	}
}

func lineWith(s, sub string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}
