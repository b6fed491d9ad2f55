package guestinit

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/testutil"
)

func writeRoot(t *testing.T, root string, files map[string]string) {
	t.Helper()
	for p, content := range files {
		host := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(host), 0o755); err != nil {
			t.Fatal(err)
		}
		mode := os.FileMode(0o644)
		if strings.HasPrefix(content, "#!") || strings.HasSuffix(p, "bin/app") {
			mode = 0o755
		}
		if err := os.WriteFile(host, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
}

const passwd = `root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:App:/home/app:/bin/sh
broken:x:notanumber:1::/:/bin/sh
short:x:1
`

const group = `root:x:0:
daemon:x:1:
app:x:1000:
audio:x:29:app,daemon
video:x:44:app
staff:x:50:
`

func TestLookupUser(t *testing.T) {
	root := t.TempDir()
	writeRoot(t, root, map[string]string{"etc/passwd": passwd, "etc/group": group})
	for _, tc := range []struct {
		user string
		want account
		err  bool
	}{
		{"", account{uid: 0, gid: 0, home: "/root", name: "root"}, false},
		{"root", account{uid: 0, gid: 0, home: "/root", name: "root"}, false},
		{"app", account{uid: 1000, gid: 1000, groups: []uint32{29, 44}, home: "/home/app", name: "app"}, false},
		{"1000", account{uid: 1000, gid: 1000, groups: []uint32{29, 44}, home: "/home/app", name: "app"}, false},
		{"app:staff", account{uid: 1000, gid: 50, home: "/home/app", name: "app"}, false},
		{"app:7", account{uid: 1000, gid: 7, home: "/home/app", name: "app"}, false},
		{"4242", account{uid: 4242, gid: 0, home: "/", name: "4242"}, false},
		{"4242:4343", account{uid: 4242, gid: 4343, home: "/", name: "4242"}, false},
		{"nobody", account{}, true},
		{"app:nogroup", account{}, true},
		{"broken", account{}, true},
	} {
		got, err := lookupUser(root, tc.user)
		if tc.err {
			if !errors.Is(err, ErrUser) {
				t.Errorf("lookupUser(%q) = %+v, %v; want ErrUser", tc.user, got, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("lookupUser(%q): %v", tc.user, err)
			continue
		}
		if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(account{}), cmpopts.EquateEmpty()); diff != "" {
			t.Errorf("lookupUser(%q) (-want +got):\n%s", tc.user, diff)
		}
	}
	// An image without /etc/passwd (scratch) still runs numeric users.
	if got, err := lookupUser(t.TempDir(), "65532:65532"); err != nil || got.uid != 65532 || got.gid != 65532 {
		t.Errorf("lookupUser on a scratch image = %+v, %v", got, err)
	}
}

func TestResolveMain(t *testing.T) {
	root := t.TempDir()
	writeRoot(t, root, map[string]string{
		"etc/passwd": passwd, "etc/group": group,
		"usr/local/bin/app": "binary",
		strings.TrimPrefix(guestabi.ImageConfigFile, "/"): `{"entrypoint":["app","--serve"],"cmd":["x"],"env":["PATH=/usr/local/bin:/bin","A=1"],"working_dir":"/srv","user":"app"}`,
	})
	got, err := resolveMain(root, guestabi.MainOverride{Cmd: []string{"y"}, Env: []string{"A=2"}})
	if err != nil {
		t.Fatal(err)
	}
	want := mainSpec{path: "/usr/local/bin/app", argv: []string{"app", "--serve", "y"},
		env: []string{"PATH=/usr/local/bin:/bin", "HOME=/home/app", "A=2"}, dir: "/srv",
		acct: account{uid: 1000, gid: 1000, groups: []uint32{29, 44}, home: "/home/app", name: "app"}}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(mainSpec{}, account{})); diff != "" {
		t.Errorf("resolveMain (-want +got):\n%s", diff)
	}

	if _, err := resolveMain(t.TempDir(), guestabi.MainOverride{}); !errors.Is(err, errNoMain) {
		t.Errorf("no image config: %v, want errNoMain", err)
	}
	if _, err := resolveMain(root, guestabi.MainOverride{Cmd: []string{}}); err != nil {
		t.Errorf("entrypoint only: %v", err)
	}
	writeRoot(t, root, map[string]string{strings.TrimPrefix(guestabi.ImageConfigFile, "/"): `{"cmd":["missing-program"]}`})
	if _, err := resolveMain(root, guestabi.MainOverride{}); err == nil || !strings.Contains(err.Error(), "not found in PATH") {
		t.Errorf("missing program: %v", err)
	}
	writeRoot(t, root, map[string]string{strings.TrimPrefix(guestabi.ImageConfigFile, "/"): `{"cmd":["/bin/x"],"user":"ghost"}`})
	if _, err := resolveMain(root, guestabi.MainOverride{}); !errors.Is(err, ErrUser) {
		t.Errorf("unknown user: %v", err)
	}
}

func TestWriteHosts(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts")
	if err := writeHosts(p, "vm-1"); err != nil {
		t.Fatal(err)
	}
	if err := writeHosts(p, "vm-1"); err != nil { // idempotent
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	if strings.Count(string(b), "vm-1") != 1 || strings.Count(string(b), "127.0.0.1\tlocalhost") != 1 {
		t.Errorf("hosts = %q", b)
	}
	// resolv.conf as a dangling symlink (a resolver stub) becomes a file.
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../run/systemd/resolve/stub-resolv.conf", filepath.Join(root, "etc/resolv.conf")); err != nil {
		t.Fatal(err)
	}
	if err := writeNameFiles(root, "", []string{"10.0.0.1", "9.9.9.9"}); err != nil {
		t.Fatal(err)
	}
	st, err := os.Lstat(filepath.Join(root, "etc/resolv.conf"))
	b, _ = os.ReadFile(filepath.Join(root, "etc/resolv.conf"))
	if err != nil || !st.Mode().IsRegular() || !strings.Contains(string(b), "nameserver 10.0.0.1\nnameserver 9.9.9.9\n") {
		t.Errorf("resolv.conf: %v %v %q", st.Mode(), err, b)
	}
}

// TestProcsStatus starts children through procs and reaps them as PID 1's
// signal loop does: each waiter gets its own status.
func TestProcsStatus(t *testing.T) {
	testutil.RequiresTool(t, "sh")
	sh, err := lookPath("/", "sh", nil)
	if err != nil {
		t.Fatalf("lookPath sh: %v", err)
	}
	p := newProcs()
	_, done, err := p.start(sh, []string{"sh", "-c", "exit 7"}, &syscall.ProcAttr{Files: []uintptr{0, 1, 2}})
	if err != nil {
		t.Fatal(err)
	}
	_, killed, err := p.start(sh, []string{"sh", "-c", "kill -9 $$"}, &syscall.ProcAttr{Files: []uintptr{0, 1, 2}})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.After(10 * time.Second)
	var got []string
	for len(got) < 2 {
		p.reap()
		select {
		case ws := <-done:
			got = append(got, describe(ws))
		case ws := <-killed:
			got = append(got, describe(ws))
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			t.Fatalf("children not reaped; got %q", got)
		}
	}
	if !contains(got, "exit status 7") || !contains(got, "killed by SIGKILL") {
		t.Errorf("statuses = %q, want exit status 7 and killed by SIGKILL", got)
	}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func TestParseStat(t *testing.T) {
	for in, want := range map[string][2]bool{
		"42 (sh) S 1 42 42 0 -1 4194560 100 0 0 0":    {true, false},
		"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0":   {true, true},
		"77 (a) b) c) Z 1 77 77 0 -1 4194624 0 0 0 0": {false, false},
		"9 (weird": {false, false},
	} {
		alive, kthread := parseStat([]byte(in))
		if alive != want[0] || kthread != want[1] {
			t.Errorf("parseStat(%q) = alive %v kthread %v, want %v", in, alive, kthread, want)
		}
	}
}

func TestPrefixWriter(t *testing.T) {
	var out strings.Builder
	pw := &prefixWriter{w: &out, prefix: "main| "}
	for _, chunk := range []string{"one\ntw", "o\n", "", "three\nfour"} {
		_, _ = pw.Write([]byte(chunk))
	}
	pw.flush()
	if want := "main| one\nmain| two\nmain| three\nmain| four\n"; out.String() != want {
		t.Errorf("prefixed output %q, want %q", out.String(), want)
	}
}

func TestAptMirrors(t *testing.T) {
	root := t.TempDir()
	writeRoot(t, root, map[string]string{
		"etc/apt/sources.list":              "deb http://deb.example.org/debian bookworm main\n# deb http://commented.example/ x\ndeb [arch=amd64] https://secure.example:8443/d bookworm main\n",
		"etc/apt/sources.list.d/x.sources":  "Types: deb\nURIs: http://deb.example.org/debian http://other.example/debian\nSuites: bookworm\n",
		"etc/apt/sources.list.d/cdrom.list": "deb cdrom:[Debian]/ bookworm main\n",
	})
	got := aptMirrors(root)
	want := []string{"deb.example.org:80", "secure.example:8443", "other.example:80"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("aptMirrors (-want +got):\n%s", diff)
	}
	if err := reachMirror(nil, time.Second); err == nil {
		t.Errorf("no mirrors: reachable")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := closed.Addr().String()
	_ = closed.Close()
	if err := reachMirror([]string{dead, l.Addr().String()}, 2*time.Second); err != nil {
		t.Errorf("one mirror listening: %v", err)
	}
	if err := reachMirror([]string{dead}, 2*time.Second); err == nil {
		t.Errorf("a closed port counted as a route out")
	}
}
