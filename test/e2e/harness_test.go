// Package e2e holds banger's end-to-end tests: the real daemon and CLI
// binaries, run inside a network namespace the test creates, pulling a real
// Debian image from a real registry (Debian's docker-registry) and booting
// it under QEMU.
package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// binaries builds banger, the guest agent and banger-init once per test
// binary.
func binaries(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "banger-e2e-bin-")
		if binErr != nil {
			return
		}
		for _, b := range []struct{ out, pkg string }{
			{"banger", "./cmd/banger"},
			{"banger-vsock-agent", "./cmd/banger-vsock-agent"},
			{"banger-init", "./cmd/banger-init"},
			{"banger-fake-firecracker", "./cmd/banger-fake-firecracker"},
		} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, b.out), b.pkg)
			cmd.Dir = repoRoot()
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				binErr = fmt.Errorf("go build %s: %w\n%s", b.pkg, err, out)
				return
			}
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binDir
}

func repoRoot() string {
	wd, _ := os.Getwd()
	return filepath.Clean(filepath.Join(wd, "..", ".."))
}

// NetNS is a network namespace made for one test.
type NetNS struct {
	Name string
}

// newNetNS creates a network namespace with lo up; it is removed, and every
// process left in it killed, when the test ends.
func newNetNS(t *testing.T) *NetNS {
	t.Helper()
	testutil.RequiresNetNS(t)
	var b [4]byte
	_, _ = rand.Read(b[:])
	ns := &NetNS{Name: "bgr-e2e-" + hex.EncodeToString(b[:])}
	if out, err := exec.Command("ip", "netns", "add", ns.Name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", ns.Name, err, out)
	}
	t.Cleanup(func() {
		for _, pid := range ns.pids() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(200 * time.Millisecond)
		if out, err := exec.Command("ip", "netns", "del", ns.Name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns.Name, err, out)
		}
	})
	ns.mustRun(t, "ip", "link", "set", "lo", "up")
	return ns
}

// cmd returns a command that runs inside the namespace.
func (ns *NetNS) cmd(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

func (ns *NetNS) mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := ns.cmd(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("in netns %s: %s %v: %v\n%s", ns.Name, name, args, err, out)
	}
	return string(out)
}

// pids lists the processes in the namespace.
func (ns *NetNS) pids() []int {
	out, _ := exec.Command("ip", "netns", "pids", ns.Name).Output()
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		var p int
		if _, err := fmt.Sscan(f, &p); err == nil {
			pids = append(pids, p)
		}
	}
	return pids
}

// Registry is Debian's docker-registry serving on 127.0.0.1:5000 inside a
// namespace.
type Registry struct {
	Addr string
}

func startRegistry(t *testing.T, ns *NetNS) *Registry {
	t.Helper()
	testutil.RequiresTool(t, "docker-registry", "skopeo")
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yml")
	conf := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:5000\n", filepath.Join(dir, "data"))
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := ns.cmd("docker-registry", "serve", cfg)
	logf, _ := os.Create(filepath.Join(dir, "registry.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if err := ns.cmd("sh", "-c", "exec 3<>/dev/tcp/127.0.0.1/5000").Run(); err == nil {
			break
		}
		// dash has no /dev/tcp: fall back to a Go dial inside the netns via bash.
		if err := ns.cmd("bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/5000").Run(); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "registry.log"))
			t.Fatalf("docker-registry did not come up in the namespace:\n%s", b)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return &Registry{Addr: "127.0.0.1:5000"}
}

// debianLayout returns an OCI image layout (cached) holding the Debian test
// root filesystem as a single gzip layer, tagged "test".
func debianLayout(t *testing.T, variant string, packages []string) string {
	t.Helper()
	tarPath := testutil.DebianRootfsTar(t, variant, packages)
	if variant == "" {
		variant = "std"
	}
	dir := filepath.Join(testutil.CacheDir(), "oci-debian-"+variant)
	stamp := filepath.Join(dir, ".complete")
	if fi, err := os.Stat(stamp); err == nil {
		if tfi, err := os.Stat(tarPath); err == nil && !tfi.ModTime().After(fi.ModTime()) {
			return dir
		}
	}
	_ = os.RemoveAll(dir)
	layer, err := tarball.LayerFromFile(tarPath, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.ConfigFile(img, mustConfig(img))
	if err != nil {
		t.Fatal(err)
	}
	img = mutate.ConfigMediaType(mutate.MediaType(img, types.OCIManifestSchema1), types.OCIConfigJSON)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "test"})); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stamp, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// push copies an OCI layout into the registry as repo:test.
func (r *Registry) push(t *testing.T, ns *NetNS, layoutDir, repo string) string {
	t.Helper()
	ref := r.Addr + "/" + repo + ":test"
	ns.mustRun(t, "skopeo", "copy", "--quiet", "--dest-tls-verify=false", "oci:"+layoutDir+":test", "docker://"+ref)
	return ref
}

// Daemon is a banger daemon process running inside a namespace.
type Daemon struct {
	t       *testing.T
	ns      *NetNS
	bin     string
	Dir     string
	Config  map[string]any
	Socket  string
	LogPath string
	cmd     *exec.Cmd
	sshDir  string
}

func newDaemon(t *testing.T, ns *NetNS, extra map[string]any) *Daemon {
	t.Helper()
	bins := binaries(t)
	base, err := os.MkdirTemp("", "banger-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	d := &Daemon{t: t, ns: ns, bin: filepath.Join(bins, "banger"), Dir: base, LogPath: filepath.Join(base, "daemon.log"), sshDir: filepath.Join(base, "ssh")}
	d.Socket = filepath.Join(base, "run", "banger.sock")
	d.Config = map[string]any{
		"state_dir":       filepath.Join(base, "state"),
		"cache_dir":       filepath.Join(base, "cache"),
		"runtime_dir":     filepath.Join(base, "run"),
		"socket":          d.Socket,
		"agent_binary":    filepath.Join(bins, "banger-vsock-agent"),
		"init_binary":     filepath.Join(bins, "banger-init"),
		"vmm":             "qemu",
		"healthy_timeout": "8m",
	}
	for k, v := range extra {
		d.Config[k] = v
	}
	d.Start()
	t.Cleanup(func() {
		d.Stop()
		if t.Failed() {
			b, _ := os.ReadFile(d.LogPath)
			t.Logf("daemon log:\n%s", tail(string(b), 80))
		}
	})
	return d
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (d *Daemon) StateDir() string   { return d.Config["state_dir"].(string) }
func (d *Daemon) RuntimeDir() string { return d.Config["runtime_dir"].(string) }

// Start starts the daemon process and waits for its socket.
func (d *Daemon) Start() {
	t := d.t
	t.Helper()
	raw, _ := json.MarshalIndent(d.Config, "", "  ")
	cfg := filepath.Join(d.Dir, "config.json")
	if err := os.WriteFile(cfg, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(d.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = d.ns.cmd(d.bin, "daemon", "--config", cfg, "--log-level", "debug")
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", d.Socket); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(d.LogPath)
			t.Fatalf("daemon did not come up:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop stops the daemon with SIGTERM (VMs keep running).
func (d *Daemon) Stop() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		_ = d.cmd.Process.Kill()
		<-done
	}
	d.cmd = nil
}

// Kill kills the daemon with SIGKILL.
func (d *Daemon) Kill() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Kill()
	_ = d.cmd.Wait()
	d.cmd = nil
}

// Result is what a CLI run printed.
type Result struct {
	Stdout, Stderr string
	Code           int
}

// CLI runs the banger CLI inside the namespace against the daemon.
func (d *Daemon) CLI(ctx context.Context, args ...string) Result {
	cmd := d.ns.cmd(d.bin, append([]string{"--socket", d.Socket}, args...)...)
	cmd.Env = append(os.Environ(), "BANGER_SSH_DIR="+d.sshDir)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		err = <-done
	}
	code := 0
	if err != nil {
		code = -1
		if ee, ok := err.(*exec.ExitError); ok { //nolint:errorlint
			code = ee.ExitCode()
		}
	}
	return Result{Stdout: out.String(), Stderr: errb.String(), Code: code}
}

// MustCLI runs the CLI and fails the test on a non-zero exit.
func (d *Daemon) MustCLI(ctx context.Context, args ...string) string {
	d.t.Helper()
	start := time.Now()
	r := d.CLI(ctx, args...)
	d.t.Logf("banger %s (%s)", strings.Join(args, " "), time.Since(start).Round(100*time.Millisecond))
	if r.Code != 0 {
		d.t.Fatalf("banger %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.Code, r.Stdout, tail(r.Stderr, 40))
	}
	return r.Stdout
}

// JSON runs the CLI with -o json and decodes the output into v.
func (d *Daemon) JSON(ctx context.Context, v any, args ...string) {
	d.t.Helper()
	out := d.MustCLI(ctx, append(args, "-o", "json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		d.t.Fatalf("banger %v -o json: %v\n%s", args, err, out)
	}
}

func mustConfig(img interface {
	ConfigFile() (*v1ConfigFile, error)
}) *v1ConfigFile {
	cf, err := img.ConfigFile()
	if err != nil {
		panic(err)
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Config.Cmd = []string{"/sbin/init"}
	return cf
}
