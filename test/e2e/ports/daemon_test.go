package ports

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }

// webMain is the busybox image's main process: httpd on the guest's
// loopback only.
const webMain = `mkdir -p /www && echo "hello through a published port" > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www`

// TestE2EPublishedPortThroughDaemon: vm run -p 0:8080 on a busybox image
// whose httpd binds only the guest's loopback; the body through the
// published port; again after a daemon SIGKILL and restart; a second VM
// asking for the same host port is refused and leaves no record; vm rm
// closes the port.
func TestE2EPublishedPortThroughDaemon(t *testing.T) {
	e := e2etest.SetupBusybox(t, nil, "web", webMain, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	d := e.D
	httpget := filepath.Join(t.TempDir(), "httpget")
	goBuild(ctx, t, httpget, "./testdata/httpget")
	share := filepath.Join(t.TempDir(), "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(share, "hello.txt"), []byte("from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := d.MustCLI(ctx, "vm", "run", "--image", "web", "--name", "web", "-p", "0:8080", "--mount", share+":/mnt/src")
	if !strings.Contains(out, "published 8080/tcp -> 127.0.0.1:") {
		t.Errorf("vm run output does not name the published port:\n%s", out)
	}
	addr := strings.TrimSpace(d.MustCLI(ctx, "port", "web", "8080"))
	if !strings.HasPrefix(addr, "127.0.0.1:") || strings.HasSuffix(addr, ":0") {
		t.Fatalf("banger port web 8080 = %q, want 127.0.0.1:<chosen port>", addr)
	}
	get := func(what string) {
		t.Helper()
		var body, last string
		deadline := time.Now().Add(60 * time.Second)
		for time.Now().Before(deadline) {
			out, err := e2etest.CombinedOutput(e.NS.Cmd(httpget, "http://"+addr+"/index.html"))
			if err == nil {
				body = string(out)
				break
			}
			last = fmt.Sprintf("%v: %s", err, out)
			time.Sleep(time.Second)
		}
		if body != "hello through a published port\n" {
			t.Fatalf("%s: GET http://%s/ = %q (last error %s); want the guest's page", what, addr, body, last)
		}
	}
	get("after vm run")
	if insp := d.MustCLI(ctx, "vm", "inspect", "web"); !strings.Contains(insp, "8080/tcp -> "+addr) {
		t.Errorf("vm inspect does not show the port:\n%s", insp)
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

	d.Kill()
	d.Start()
	e2etest.WaitSettled(ctx, t, d, 2*time.Minute)
	get("after a daemon SIGKILL and restart")

	port := addr[strings.LastIndex(addr, ":")+1:]
	res := d.CLI(ctx, "vm", "create", "--image", "web", "--name", "dup", "-p", port+":8080")
	if res.Code == 0 || !strings.Contains(res.Stderr, "already in use") {
		t.Errorf("vm create -p %s:8080 with the port taken: exit %d, stderr %q; want a refusal saying it is in use", port, res.Code, res.Stderr)
	}
	if ls := d.MustCLI(ctx, "vm", "ls"); strings.Contains(ls, "dup") || strings.Contains(ls, "nomount") {
		t.Errorf("a refused create left a VM record:\n%s", ls)
	}

	d.MustCLI(ctx, "vm", "rm", "--force", "web")
	if out, err := e2etest.CombinedOutput(e.NS.Cmd(httpget, "http://"+addr+"/")); err == nil {
		t.Errorf("the published port still answers after vm rm: %q", out)
	}
}
