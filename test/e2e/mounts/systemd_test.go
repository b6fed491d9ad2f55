package mounts

import (
	"archive/tar"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// readerUnit is a plain service (default dependencies) that reads the
// shared folder once at boot and keeps what it saw.
const readerUnit = `[Unit]
Description=reads a host folder at boot (banger e2e)

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'cat /mnt/src/hello.txt > /run/seen-at-boot 2>&1 || echo "boot read failed: $?" >> /run/seen-at-boot'

[Install]
WantedBy=multi-user.target
`

// systemdReaderLayout is the standard Debian test image (systemd as PID 1)
// with readerUnit installed and enabled, as an OCI layout.
func systemdReaderLayout(t *testing.T) string {
	t.Helper()
	base := testutil.DebianRootfsTar(t, "", nil)
	out := filepath.Join(t.TempDir(), "rootfs.tar")
	in, err := os.Open(base)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr, tw := tar.NewReader(in), tar.NewWriter(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(tw, tr); err != nil { //nolint:gosec // our own fixture
			t.Fatal(err)
		}
	}
	now := time.Now()
	unit := "./etc/systemd/system/boot-reader.service"
	for _, h := range []*tar.Header{
		{Name: unit, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(readerUnit)), ModTime: now},
		{Name: "./etc/systemd/system/multi-user.target.wants/boot-reader.service", Typeflag: tar.TypeSymlink, Linkname: strings.TrimPrefix(unit, "."), Mode: 0o777, ModTime: now},
	} {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write([]byte(readerUnit)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return e2etest.LayoutOf(t, out, v1.Config{Cmd: []string{"/sbin/init"}})
}

// testSystemdBoot: on a systemd image, a plain service started at boot
// (default dependencies, nothing about banger in it) reads the folder and
// sees the host's file: the agent mounts it before basic.target and the
// host serves it once the agent is up.
func testSystemdBoot(t *testing.T, ctx context.Context, e *e2etest.Env, c cli, f *folders) {
	d := e.D
	ref := e.Reg.Push(t, e.NS, systemdReaderLayout(t), "banger/reader")
	d.MustCLI(ctx, "image", "pull", ref, "--name", "reader", "--kernel-ref", "deb-cloud")
	c.must(t, ctx, "vm", "run", "--image", "reader", "--name", "sd", "--mount", f.share+":/mnt/src:ro")
	var seen string
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		if r := c.sh(ctx, "sd", "cat /run/seen-at-boot"); r.Code == 0 && r.Stdout != "" {
			seen = r.Stdout
			break
		}
	}
	if seen != "hello from the host\n" {
		t.Errorf("a systemd service started at boot read /mnt/src/hello.txt as %q; want the host's file", seen)
		if r := c.sh(ctx, "sd", "systemctl status boot-reader.service banger-vsock-agent.service --no-pager 2>&1 | head -40"); r.Code != -1 {
			t.Logf("guest units:\n%s", r.Stdout)
		}
	}
	c.must(t, ctx, "vm", "rm", "--force", "sd")
}
