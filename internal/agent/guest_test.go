package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"
	"time"
)

func modeOf(t *testing.T, p string) fs.FileMode {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestAuthorizeKey(t *testing.T) {
	s := newTestServer(t)
	file := filepath.Join(s.Root, AuthorizedKeysFile)
	k1 := testKey(t, "banger@host")
	k2 := testKey(t, "other")

	added, err := s.authorizeKey(k1 + "\n")
	if err != nil || !added {
		t.Fatalf("authorizeKey(k1) = %v, %v; want true, nil", added, err)
	}
	if m := modeOf(t, filepath.Dir(file)); m != 0o700 {
		t.Errorf(".ssh mode %o, want 700", m)
	}
	if m := modeOf(t, file); m != 0o600 {
		t.Errorf("authorized_keys mode %o, want 600", m)
	}
	// Same key, other comment: already there. Wrong modes get fixed.
	if err := os.Chmod(file, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Dir(file), 0o755); err != nil {
		t.Fatal(err)
	}
	k1other := strings.Join(strings.Fields(k1)[:2], " ") + " renamed"
	if added, err := s.authorizeKey(k1other); err != nil || added {
		t.Errorf("authorizeKey(k1 again) = %v, %v; want false, nil", added, err)
	}
	if m := modeOf(t, file); m != 0o600 {
		t.Errorf("authorized_keys mode %o after re-authorize, want 600", m)
	}
	if m := modeOf(t, filepath.Dir(file)); m != 0o700 {
		t.Errorf(".ssh mode %o after re-authorize, want 700", m)
	}
	if added, err := s.authorizeKey(k2); err != nil || !added {
		t.Errorf("authorizeKey(k2) = %v, %v; want true, nil", added, err)
	}
	got, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if want := k1 + "\n" + k2 + "\n"; string(got) != want {
		t.Errorf("authorized_keys = %q, want %q", got, want)
	}
	if os.Geteuid() == 0 {
		fi, _ := os.Stat(file)
		if st, ok := fi.Sys().(interface{ Uid() uint32 }); ok && st.Uid() != 0 {
			t.Errorf("authorized_keys owned by %d, want root", st.Uid())
		}
	}
}

func TestAuthorizeKeyKeepsExistingLines(t *testing.T) {
	s := newTestServer(t)
	existing := "# managed by hand\n" + testKey(t, "user@laptop") // no trailing newline
	writeGuestFile(t, s.Root, AuthorizedKeysFile, existing)
	k := testKey(t, "banger")
	if added, err := s.authorizeKey(k); err != nil || !added {
		t.Fatalf("authorizeKey = %v, %v", added, err)
	}
	got, _ := os.ReadFile(filepath.Join(s.Root, AuthorizedKeysFile))
	if want := existing + "\n" + k + "\n"; string(got) != want {
		t.Errorf("authorized_keys = %q, want %q", got, want)
	}
}

func TestAuthorizeKeyRejects(t *testing.T) {
	s := newTestServer(t)
	k := testKey(t, "c")
	cases := map[string]string{
		"empty":            "",
		"garbage":          "hello world",
		"two keys":         k + "\n" + testKey(t, "d"),
		"options":          `command="/bin/sh" ` + k,
		"embedded CR":      strings.Replace(k, " c", "\r c", 1),
		"NUL":              k + "\x00",
		"private key":      "-----BEGIN OPENSSH PRIVATE KEY-----",
		"truncated base64": k[:40],
	}
	for name, line := range cases {
		t.Run(name, func(t *testing.T) {
			resp := s.Handle(context.Background(), Request{V: ProtocolVersion, ID: 1, Op: OpAuthorizeKey, Key: line})
			if resp.Error == nil || resp.Error.Code != CodeInvalidArgument {
				t.Errorf("authorize_key(%q) = %+v, want invalid_argument", line, resp)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(s.Root, AuthorizedKeysFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("rejected keys left an authorized_keys behind: %v", err)
	}
}

func TestAuthorizeKeyRefusesSymlinks(t *testing.T) {
	s := newTestServer(t)
	elsewhere := t.TempDir()
	if err := os.MkdirAll(filepath.Join(s.Root, "root"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, filepath.Join(s.Root, "root", ".ssh")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.authorizeKey(testKey(t, "x")); err == nil {
		t.Error("authorizeKey through a symlinked .ssh succeeded, want an error")
	}
	if entries, _ := os.ReadDir(elsewhere); len(entries) != 0 {
		t.Errorf("wrote %v through the symlink", entries)
	}
}

func TestStatusFirstBoot(t *testing.T) {
	cases := []struct {
		name   string
		status string // "" : no status file
		marker bool
		want   FirstBootState
	}{
		{"nothing: nothing to do", "", false, FirstBootDone},
		{"marker only", "", true, FirstBootPending},
		{"pending", "pending\n", true, FirstBootPending},
		{"running", "running\n", true, FirstBootRunning},
		{"failed keeps marker", "failed\n", true, FirstBootFailed},
		{"done", "done\n", false, FirstBootDone},
		{"garbage", "\x00\x01 exploded", false, FirstBootUnknown},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t)
			if tc.status != "" {
				writeGuestFile(t, s.Root, FirstBootStatusFile, tc.status)
			}
			if tc.marker {
				writeGuestFile(t, s.Root, FirstBootMarkerFile, "")
			}
			st := s.status(context.Background())
			if st.FirstBoot != tc.want {
				t.Errorf("FirstBoot = %q, want %q", st.FirstBoot, tc.want)
			}
		})
	}
}

func TestStatusLogAndHostKey(t *testing.T) {
	s := newTestServer(t)
	var log strings.Builder
	for i := range 30 {
		fmt.Fprintf(&log, "step %d\n", i)
	}
	log.WriteString("bad utf8 \xff\xfe\n")
	writeGuestFile(t, s.Root, FirstBootLogFile, log.String())
	key := testKey(t, "root@guest")
	writeGuestFile(t, s.Root, HostKeyFile, key+"\n")

	st := s.status(context.Background())
	if len(st.FirstBootLog) != FirstBootLogLines || st.FirstBootLog[0] != "step 11" || st.FirstBootLog[19] != "bad utf8 \uFFFD" {
		t.Errorf("FirstBootLog = %q, want steps 11..29 then the sanitised last line", st.FirstBootLog)
	}
	if want := strings.Join(strings.Fields(key)[:2], " "); st.HostKey != want {
		t.Errorf("HostKey = %q, want %q", st.HostKey, want)
	}

	writeGuestFile(t, s.Root, HostKeyFile, "ssh-ed25519 not-base64!!\n")
	if st := s.status(context.Background()); st.HostKey != "" {
		t.Errorf("HostKey from a corrupt file = %q, want empty", st.HostKey)
	}
}

func TestStatusRealAddresses(t *testing.T) {
	s := NewServer(t.TempDir(), "v")
	st := s.status(context.Background())
	for _, a := range st.Addresses {
		ip, _, err := net.ParseCIDR(a.CIDR)
		if err != nil || ip.To4() == nil || ip.IsLoopback() || a.Interface == "" {
			t.Errorf("address %+v is not a non-loopback IPv4 CIDR on a named interface", a)
		}
	}
}

func TestFindSerialPort(t *testing.T) {
	root := t.TempDir()
	if _, err := FindSerialPort(root, SerialPortName); !errors.Is(err, ErrPortNotFound) {
		t.Errorf("FindSerialPort(empty root) = %v, want ErrPortNotFound", err)
	}
	writeGuestFile(t, root, "sys/class/virtio-ports/vport0p1/name", "org.qemu.guest_agent.0\n")
	writeGuestFile(t, root, "sys/class/virtio-ports/vport1p2/name", SerialPortName+"\n")
	if _, err := FindSerialPort(root, SerialPortName); !errors.Is(err, ErrPortNotFound) {
		t.Errorf("FindSerialPort(sysfs entry, no device) = %v, want ErrPortNotFound", err)
	}
	writeGuestFile(t, root, "dev/vport1p2", "")
	got, err := FindSerialPort(root, SerialPortName)
	if want := filepath.Join(root, "dev/vport1p2"); err != nil || got != want {
		t.Errorf("FindSerialPort(sysfs) = %q, %v; want %q", got, err, want)
	}
	writeGuestFile(t, root, "dev/virtio-ports/"+SerialPortName, "")
	got, err = FindSerialPort(root, SerialPortName)
	if want := filepath.Join(root, "dev/virtio-ports", SerialPortName); err != nil || got != want {
		t.Errorf("FindSerialPort(udev link) = %q, %v; want %q", got, err, want)
	}
	if _, err := FindSerialPort(root, "../etc"); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("FindSerialPort(../etc) = %v, want ErrInvalidArgument", err)
	}
}

// fakeFirecrackerVsock implements the host side of Firecracker's vsock
// device as docs/vsock.md specifies it: the host connects to uds_path and
// sends "CONNECT <port>\n"; if a guest listener exists on that port,
// Firecracker answers "OK <hostport>\n" and splices the connection to it;
// otherwise it closes the connection. Guest listeners are agent servers.
type fakeFirecrackerVsock struct {
	t         *testing.T
	listeners map[uint32]*Server
	hostPort  uint32
	connects  chan string
}

func (f *fakeFirecrackerVsock) serve(ctx context.Context, l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			br := bufio.NewReader(c)
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			f.connects <- line
			rest, ok := strings.CutPrefix(line, "CONNECT ")
			if !ok {
				return
			}
			port, err := strconv.ParseUint(strings.TrimSuffix(rest, "\n"), 10, 32)
			if err != nil || strings.TrimSuffix(rest, "\n") != strconv.FormatUint(port, 10) {
				return
			}
			srv, ok := f.listeners[uint32(port)]
			if !ok {
				return // nobody listening: connection closed
			}
			f.hostPort++
			if _, err := fmt.Fprintf(c, "OK %d\n", f.hostPort); err != nil {
				return
			}
			if br.Buffered() > 0 {
				f.t.Errorf("host sent %d bytes before reading OK", br.Buffered())
				return
			}
			_ = srv.ServeConn(ctx, c)
		}()
	}
}

func TestVsockUDSConnect(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	defer l.Close()
	fc := &fakeFirecrackerVsock{t: t, listeners: map[uint32]*Server{DefaultPort: newTestServer(t)}, hostPort: 1073741823, connects: make(chan string, 16)}
	go fc.serve(ctx, l)

	c, err := Dial(ctxTimeout(t, 5*time.Second), TransportVsockUDS, path)
	if err != nil {
		t.Fatalf("Dial(vsock-uds): %v", err)
	}
	if got := <-fc.connects; got != "CONNECT 1024\n" {
		t.Errorf("handshake sent %q, want %q", got, "CONNECT 1024\n")
	}
	exercise(t, c)
	_ = c.Close()

	_, err = ConnectVsockUDS(ctxTimeout(t, 5*time.Second), path, 52)
	if !errors.Is(err, ErrConnectRefused) {
		t.Errorf("ConnectVsockUDS(port 52, nobody listening) = %v, want ErrConnectRefused", err)
	}
	if _, err := Dial(ctxTimeout(t, 5*time.Second), TransportVsockUDS, filepath.Join(t.TempDir(), "missing.sock")); err == nil {
		t.Error("Dial(vsock-uds) to a missing socket succeeded")
	}
}

func TestVsockUDSBadAnswers(t *testing.T) {
	for name, answer := range map[string]string{
		"not OK":      "NOPE\n",
		"no port":     "OK \n",
		"endless":     strings.Repeat("O", 100),
		"silent":      "",
		"OK no EOL":   "OK 5",
		"negative OK": "OK -1\n",
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "v.sock")
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			go func() {
				c, err := l.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				_, _ = bufio.NewReader(c).ReadString('\n')
				_, _ = c.Write([]byte(answer))
				time.Sleep(2 * time.Second) // hold the connection open
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			c, err := ConnectVsockUDS(ctx, path, DefaultPort)
			if err == nil {
				_ = c.Close()
				t.Fatalf("ConnectVsockUDS with answer %q succeeded", answer)
			}
		})
	}
}

func TestParseVsockAddr(t *testing.T) {
	for in, want := range map[string][2]uint32{"3": {3, DefaultPort}, "3:52": {3, 52}} {
		cid, port, err := parseVsockAddr(in)
		if err != nil || cid != want[0] || port != want[1] {
			t.Errorf("parseVsockAddr(%q) = %d, %d, %v; want %v", in, cid, port, err, want)
		}
	}
	for _, in := range []string{"", "x", "3:", "3:x", "-1", "99999999999"} {
		if _, _, err := parseVsockAddr(in); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("parseVsockAddr(%q) = %v, want ErrInvalidArgument", in, err)
		}
	}
}

// AF_VSOCK needs a transport: a guest's virtio device, or vsock_loopback
// on a host. Where the socket family exists the listener must bind; a
// connection is tried only when loopback is available.
func TestVsockListener(t *testing.T) {
	testutil.RequiresVsock(t)
	l, err := ListenVsock(0xbad0)
	if err != nil {
		t.Fatalf("ListenVsock: %v", err)
	}
	defer l.Close()
	if a, ok := l.Addr().(VsockAddr); !ok || a.Port != 0xbad0 {
		t.Errorf("Addr() = %v, want port %d", l.Addr(), 0xbad0)
	}
	if _, err := os.Stat("/sys/module/vsock_loopback"); err != nil {
		testutil.Missing(t, testutil.TierVsock, "vsock_loopback is not loaded: cannot connect to our own listener (bind checked)")
	}
	s := newTestServer(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = s.Serve(ctx, l) }()
	c, err := Dial(ctxTimeout(t, 5*time.Second), TransportVsock, "1:"+strconv.Itoa(0xbad0))
	if err != nil {
		t.Fatalf("Dial(vsock, loopback): %v", err)
	}
	defer c.Close()
	exercise(t, c)
}
