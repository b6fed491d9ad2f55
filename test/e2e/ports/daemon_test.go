package ports

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// webPage is what the guest's httpd serves at /index.html.
const webPage = "hello through a published port\n"

// webMain is the busybox image's main process: a UDP echo on the guest's
// loopback 9999, blast (the benchmark's byte source) on 9000, an httpd on
// every address at 8081 (the benchmark's reference over the bridge), and
// the main httpd on the guest's loopback only, 8080.
const webMain = `mkdir -p /www; echo "hello through a published port" > /www/index.html; ` +
	`/bin/udpecho 127.0.0.1:9999 & /bin/blast 0.0.0.0:9000 & httpd -p 0.0.0.0:8081 -h /www; ` +
	`exec httpd -f -p 127.0.0.1:8080 -h /www`

// webTools are the test's programs: httpget and pfclient run on the host
// side (in the namespace, or as a second uid), udpecho and blast in the
// guest.
type webTools struct {
	httpget, pfclient, udpecho, blast string
}

func buildWebTools(ctx context.Context, t *testing.T) webTools {
	dir := t.TempDir()
	w := webTools{
		httpget: filepath.Join(dir, "httpget"), pfclient: filepath.Join(dir, "pfclient"),
		udpecho: filepath.Join(dir, "udpecho"), blast: filepath.Join(dir, "blast"),
	}
	goBuild(ctx, t, w.httpget, "./testdata/httpget")
	goBuild(ctx, t, w.pfclient, "./testdata/pfclient")
	goBuild(ctx, t, w.udpecho, "./testdata/udpecho")
	goBuild(ctx, t, w.blast, "./testdata/blast")
	return w
}

// TestE2EPublishedPortThroughDaemon: vm run -p 0:8080 -p 0:9999/udp on a
// busybox image whose httpd and UDP echo bind only the guest's loopback;
// the body and the echo through the published ports; banger port-forward
// (two mappings, a refused guest port, SIGINT, a second uid); again after
// a daemon SIGKILL and restart; a second VM asking for the same host port
// is refused and leaves no record; vm rm closes the ports. With
// BANGER_BENCH=1, the ports benchmark on the same VM.
func TestE2EPublishedPortThroughDaemon(t *testing.T) {
	budget := 8 * time.Minute
	if os.Getenv("BANGER_BENCH") == "1" {
		budget += 12 * time.Minute // 3 GiB and 600 requests through a TCG guest on a loaded host
	}
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	tools := buildWebTools(ctx, t)
	e := e2etest.SetupBusybox(t, nil, "web", webMain, map[string]string{"bin/udpecho": tools.udpecho, "bin/blast": tools.blast})
	d := e.D
	share := filepath.Join(t.TempDir(), "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(share, "hello.txt"), []byte("from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := d.MustCLI(ctx, "vm", "run", "--image", "web", "--name", "web", "-p", "0:8080", "-p", "0:9999/udp", "-p", "0:9000", "-p", "0:8081", "--mount", share+":/mnt/src")
	for _, want := range []string{"published 8080/tcp -> 127.0.0.1:", "published 9999/udp -> 127.0.0.1:"} {
		if !strings.Contains(out, want) {
			t.Errorf("vm run output does not name the published port (%q):\n%s", want, out)
		}
	}
	hostAddr := func(port string) string {
		t.Helper()
		addr := strings.TrimSpace(d.MustCLI(ctx, "port", "web", port))
		if !strings.HasPrefix(addr, "127.0.0.1:") || strings.HasSuffix(addr, ":0") {
			t.Fatalf("banger port web %s = %q, want 127.0.0.1:<chosen port>", port, addr)
		}
		return addr
	}
	addr, udpAddr := hostAddr("8080"), hostAddr("9999/udp")
	get := func(what string) {
		t.Helper()
		if body, last := waitGet(e, tools.httpget, "http://"+addr+"/index.html", 60*time.Second); body != webPage {
			t.Fatalf("%s: GET http://%s/ = %q (last error %s); want the guest's page", what, addr, body, last)
		}
	}
	udp := func(what string) {
		t.Helper()
		out, err := e2etest.CombinedOutput(e.NS.Cmd(tools.pfclient, "udp", udpAddr, "ping over udp "+what))
		if want := "echo:ping over udp " + what; err != nil || string(out) != want {
			t.Errorf("%s: UDP through the published %s: %q, %v; want %q", what, udpAddr, out, err, want)
		}
	}
	get("after vm run")
	udp("after vm run")
	if insp := d.MustCLI(ctx, "vm", "inspect", "web"); !strings.Contains(insp, "8080/tcp -> "+addr) || !strings.Contains(insp, "9999/udp -> "+udpAddr) {
		t.Errorf("vm inspect does not show the ports:\n%s", insp)
	}

	// The host folder, mounted once the guest is ready.
	var got string
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		r := d.CLI(ctx, "exec", "web", "--", "sh", "-c", "cat /mnt/src/hello.txt && echo from the guest > /mnt/src/guest.txt")
		if got = r.Stdout; r.Code == 0 {
			break
		}
	}
	if got != "from the host\n" {
		t.Errorf("guest reads the --mount folder: %q", got)
	}
	if b, err := os.ReadFile(filepath.Join(share, "guest.txt")); err != nil || string(b) != "from the guest\n" {
		t.Errorf("host reads the guest's file in the --mount folder: %q, %v", b, err)
	}
	res0 := d.CLI(ctx, "vm", "create", "--image", "web", "--name", "nomount", "--mount", "/nonexistent-banger:/mnt/x")
	if res0.Code == 0 {
		t.Errorf("vm create --mount of a missing folder succeeded")
	}

	t.Run("port-forward", func(t *testing.T) { testPortForward(ctx, t, e.For(t), tools) })
	if os.Getenv("BANGER_BENCH") == "1" {
		t.Run("bench", func(t *testing.T) { benchPorts(ctx, t, e.For(t), tools, hostAddr("9000"), hostAddr("8081")) })
	}

	d.Kill()
	d.Start()
	e2etest.WaitSettled(ctx, t, d, 2*time.Minute)
	get("after a daemon SIGKILL and restart")
	udp("after a daemon SIGKILL and restart")

	port := addr[strings.LastIndex(addr, ":")+1:]
	res := d.CLI(ctx, "vm", "create", "--image", "web", "--name", "dup", "-p", port+":8080")
	if res.Code == 0 || !strings.Contains(res.Stderr, "already in use") {
		t.Errorf("vm create -p %s:8080 with the port taken: exit %d, stderr %q; want a refusal saying it is in use", port, res.Code, res.Stderr)
	}
	if ls := d.MustCLI(ctx, "vm", "ls"); strings.Contains(ls, "dup") || strings.Contains(ls, "nomount") {
		t.Errorf("a refused create left a VM record:\n%s", ls)
	}

	d.MustCLI(ctx, "vm", "rm", "--force", "web")
	if out, err := e2etest.CombinedOutput(e.NS.Cmd(tools.httpget, "http://"+addr+"/")); err == nil {
		t.Errorf("the published port still answers after vm rm: %q", out)
	}
	if out, err := e2etest.CombinedOutput(e.NS.Cmd(tools.pfclient, "udp", udpAddr, "after rm")); err == nil {
		t.Errorf("the published UDP port still answers after vm rm: %q", out)
	}
}

// waitGet GETs url from inside the namespace until it answers or timeout
// passes; it returns the body and the last error.
func waitGet(e *e2etest.Env, httpget, url string, timeout time.Duration) (body, last string) {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(time.Second) {
		out, err := e2etest.CombinedOutput(e.NS.Cmd(httpget, url))
		if err == nil {
			return string(out), ""
		}
		last = fmt.Sprintf("%v: %s", err, out)
	}
	return "", last
}

// portForward is a running `banger port-forward` inside the namespace.
type portForward struct {
	cmd    *exec.Cmd
	fw     []api.PortForward
	stderr *bytes.Buffer
	done   chan error
}

// startPortForward runs `banger port-forward VM MAPPINGS... -o json` in the
// namespace and returns once it has printed its mappings.
func startPortForward(ctx context.Context, t *testing.T, e *e2etest.Env, vm string, mappings ...string) *portForward {
	t.Helper()
	d := e.D
	args := append([]string{"--socket", d.Socket, "port-forward", vm}, mappings...)
	cmd := e.NS.Cmd(d.Bin, append(args, "-o", "json")...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	pf := &portForward{cmd: cmd, stderr: &bytes.Buffer{}, done: make(chan error, 1)}
	cmd.Stderr = pf.stderr
	if err := e2etest.Start(cmd); err != nil {
		t.Fatal(err)
	}
	decoded := make(chan error, 1)
	go func() { decoded <- json.NewDecoder(stdout).Decode(&pf.fw) }()
	select {
	case err = <-decoded:
	case <-time.After(60 * time.Second):
		err = errors.New("no mappings printed in 60 s")
	case <-ctx.Done():
		err = ctx.Err()
	}
	go func() { pf.done <- cmd.Wait() }()
	if err != nil {
		_ = cmd.Process.Kill()
		<-pf.done
		t.Fatalf("banger port-forward %s %v -o json: %v; stderr:\n%s", vm, mappings, err, pf.stderr)
	}
	// Once reaped, Kill only reports that the process is done.
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return pf
}

// addr is mapping i's host address.
func (pf *portForward) addr(i int) string {
	return fmt.Sprintf("%s:%d", pf.fw[i].HostIP, pf.fw[i].HostPort)
}

// interrupt sends SIGINT and returns the exit code.
func (pf *portForward) interrupt(t *testing.T) int {
	t.Helper()
	if err := pf.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-pf.done:
		return exitCode(err)
	case <-time.After(20 * time.Second):
		_ = pf.cmd.Process.Kill()
		t.Fatalf("banger port-forward did not end within 20 s of SIGINT; stderr:\n%s", pf.stderr)
	}
	return -1
}

func exitCode(err error) int {
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.ExitCode()
	}
	return -1
}

// testPortForward: banger port-forward with two mappings (one to a service
// on the guest's loopback, one with a port chosen by :GUESTPORT) and one to
// a guest port nobody listens on; the pages through it; SIGINT ends it with
// exit 0 and no listener left; a second uid is refused both by the CLI and
// at the daemon's port-forward endpoint.
func testPortForward(ctx context.Context, t *testing.T, e *e2etest.Env, tools webTools) {
	d := e.D
	pf := startPortForward(ctx, t, e, "web", "0:8080", ":8081", "0:8099")
	if len(pf.fw) != 3 {
		t.Fatalf("port-forward printed %d mappings, want 3: %+v", len(pf.fw), pf.fw)
	}
	for i, want := range []uint16{8080, 8081, 8099} {
		f := pf.fw[i]
		if f.VM != "web" || f.HostIP != "127.0.0.1" || f.HostPort == 0 || f.GuestPort != want || f.Proto != "tcp" {
			t.Errorf("mapping %d = %+v; want web, 127.0.0.1:<chosen port> -> %d/tcp", i, f, want)
		}
	}
	for i := range 2 {
		if body, last := waitGet(e, tools.httpget, "http://"+pf.addr(i)+"/index.html", 30*time.Second); body != webPage {
			t.Errorf("GET through port-forward %s -> web:%d = %q (last error %s); want the guest's page", pf.addr(i), pf.fw[i].GuestPort, body, last)
		}
	}
	// Nothing listens on the guest's 8099: the connection fails at once,
	// and the CLI says why.
	start := time.Now()
	if out, err := e2etest.CombinedOutput(e.NS.Cmd(tools.httpget, "http://"+pf.addr(2)+"/")); err == nil || time.Since(start) > 20*time.Second {
		t.Errorf("GET through port-forward to a guest port nobody listens on: %q, %v after %s; want a failure at once", out, err, time.Since(start))
	}
	// The CLI as root reaches the endpoint itself too (pfclient's check
	// below is not refused for another reason).
	if out, err := e2etest.CombinedOutput(e.NS.Cmd(tools.pfclient, "dial", d.Socket, "web", "8080")); err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Errorf("POST /vms/web/port-forward as root: %q, %v", out, err)
	}

	if code := pf.interrupt(t); code != 0 {
		t.Errorf("banger port-forward after SIGINT: exit %d, want 0; stderr:\n%s", code, pf.stderr)
	}
	stderr := pf.stderr.String()
	if !strings.Contains(stderr, "Handling connection for "+strconv.Itoa(int(pf.fw[0].HostPort))) ||
		!strings.Contains(stderr, "nothing listens on it in the guest") {
		t.Errorf("port-forward's stderr does not report the connections and the refused guest port:\n%s", stderr)
	}
	if strings.Contains(stderr, "panic") || strings.Contains(stderr, "canceled") {
		t.Errorf("port-forward's stderr after SIGINT is not clean:\n%s", stderr)
	}
	for i := range pf.fw {
		if out, err := e2etest.CombinedOutput(e.NS.Cmd(tools.httpget, "http://"+pf.addr(i)+"/")); err == nil || !strings.Contains(string(out), "refused") {
			t.Errorf("%s after port-forward ended: %q, %v; want connection refused (no listener left)", pf.addr(i), out, err)
		}
	}

	// A second uid: not found, from the CLI and at the endpoint.
	openTo65534(t, d.Socket, d.Bin, tools.pfclient)
	as := func(name string, args ...string) (string, int) {
		c := exec.Command(name, args...) //nolint:gosec // test
		c.Env = []string{"PATH=/usr/bin:/bin", "HOME=/nonexistent"}
		c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := e2etest.CombinedOutput(c)
		code := exitCode(err)
		if code == -1 {
			t.Fatalf("%s %v as uid 65534 did not run: %v", name, args, err)
		}
		return string(out), code
	}
	if out, code := as(d.Bin, "--socket", d.Socket, "port-forward", "web", "0:8080"); code != 3 || !strings.Contains(out, "not found") {
		t.Errorf("banger port-forward web as uid 65534: exit %d, %q; want 3 (not found)", code, out)
	}
	if out, _ := as(tools.pfclient, "dial", d.Socket, "web", "8080"); !strings.HasPrefix(out, string(api.CodeNotFound)) {
		t.Errorf("POST /vms/web/port-forward as uid 65534: %q; want not_found", out)
	}
}

// openTo65534 lets uid 65534 reach the socket and the programs: it opens
// the test's own directories on the way to them (never anything above the
// run directory) and the socket itself.
func openTo65534(t *testing.T, socket string, paths ...string) {
	t.Helper()
	run := e2etest.RunDir()
	if run == "" {
		t.Fatal("no e2e run directory")
	}
	for _, target := range append([]string{socket}, paths...) {
		for p := filepath.Dir(target); p == run || strings.HasPrefix(p, run+"/"); p = filepath.Dir(p) {
			if err := os.Chmod(p, 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.Chmod(socket, 0o666); err != nil {
		t.Fatal(err)
	}
}
