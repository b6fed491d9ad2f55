package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/atomicfile"
)

// Guest-side limits on what the agent reads from the guest filesystem.
const (
	maxLogLineBytes    = 512
	logTailBytes       = 256 << 10
	maxHostKeyBytes    = 4 << 10
	maxAuthorizedBytes = 1 << 20
)

// ErrPortNotFound is returned when no virtio-serial port of that name exists (yet).
var ErrPortNotFound = errors.New("virtio-serial port not found")

func (s *Server) path(rel string) string {
	root := s.Root
	if root == "" {
		root = "/"
	}
	return filepath.Join(root, filepath.FromSlash(rel))
}

func (s *Server) health() *Health {
	hostname := os.Hostname
	if s.Hostname != nil {
		hostname = s.Hostname
	}
	h, err := hostname()
	if err != nil {
		s.logf("hostname: %v", err)
	}
	return &Health{AgentVersion: s.Version, Uptime: time.Since(s.started), Hostname: h}
}

func (s *Server) status(_ context.Context) *Status {
	st := &Status{FirstBoot: s.firstBootState()}
	lines, err := tailLines(s.path(FirstBootLogFile), FirstBootLogLines)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.logf("read first-boot log: %v", err)
	}
	st.FirstBootLog = lines
	addrs := ipv4Addresses
	if s.Addresses != nil {
		addrs = s.Addresses
	}
	if st.Addresses, err = addrs(); err != nil {
		s.logf("list addresses: %v", err)
	}
	// An image without sshd has no host key: make the one the agent's SSH
	// server uses, so the host can pin it.
	if err := s.EnsureHostKey(); err != nil {
		s.logf("make ssh host key: %v", err)
	}
	st.HostKey, err = readHostKey(s.path(HostKeyFile))
	st.Streams = StreamVersion
	for _, p := range []string{"/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"} {
		if _, err := os.Stat(s.path(p)); err == nil {
			st.SSHD = true
		}
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.logf("read host key: %v", err)
	}
	st.Init, st.Main = s.initState()
	return st
}

// firstBootState reads the status file, falling back to the marker.
func (s *Server) firstBootState() FirstBootState {
	b, err := readLimited(s.path(FirstBootStatusFile), 64)
	switch {
	case err == nil:
		if st := FirstBootState(strings.TrimSpace(string(b))); st.Valid() {
			return st
		}
		return FirstBootUnknown
	case !errors.Is(err, fs.ErrNotExist):
		s.logf("read first-boot status: %v", err)
		return FirstBootUnknown
	}
	if _, err := os.Lstat(s.path(FirstBootMarkerFile)); err == nil {
		return FirstBootPending
	} else if !errors.Is(err, fs.ErrNotExist) {
		s.logf("stat first-boot marker: %v", err)
		return FirstBootUnknown
	}
	return FirstBootDone
}

// readLimited reads at most limit bytes of a regular file.
func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path) //nolint:gosec // fixed guest paths under the configured root
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, limit))
}

// tailLines returns the last n lines of the file, each cut to
// maxLogLineBytes and made valid UTF-8. Only the file's last logTailBytes
// are read.
func tailLines(path string, n int) ([]string, error) {
	f, err := os.Open(path) //nolint:gosec // fixed guest path under the configured root
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := max(fi.Size()-logTailBytes, 0)
	buf, err := io.ReadAll(io.NewSectionReader(f, off, logTailBytes))
	if err != nil {
		return nil, err
	}
	if off > 0 {
		// The first line is probably partial.
		if i := bytes.IndexByte(buf, '\n'); i >= 0 {
			buf = buf[i+1:]
		}
	}
	buf = bytes.TrimRight(buf, "\n")
	if len(buf) == 0 {
		return nil, nil
	}
	all := bytes.Split(buf, []byte("\n"))
	if len(all) > n {
		all = all[len(all)-n:]
	}
	out := make([]string, len(all))
	for i, l := range all {
		l = bytes.TrimRight(l, "\r")
		if len(l) > maxLogLineBytes {
			l = l[:maxLogLineBytes]
		}
		out[i] = strings.ToValidUTF8(string(l), string(utf8.RuneError))
	}
	return out, nil
}

// readHostKey returns the host key line, validated, without its comment.
func readHostKey(path string) (string, error) {
	b, err := readLimited(path, maxHostKeyBytes)
	if err != nil {
		return "", err
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey(b)
	if err != nil {
		return "", fmt.Errorf("parse %s: %w", path, err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))), nil
}

// ipv4Addresses lists the IPv4 addresses of every non-loopback interface.
func ipv4Addresses() ([]InterfaceAddr, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var out []InterfaceAddr
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			return out, fmt.Errorf("addresses of %s: %w", ifc.Name, err)
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok || ipn.IP.To4() == nil {
				continue
			}
			out = append(out, InterfaceAddr{Interface: ifc.Name, CIDR: ipn.String()})
		}
	}
	return out, nil
}

// ParseAuthorizedKeyLine validates line as exactly one SSH public key in
// authorized_keys format without options, and returns it re-encoded as
// "type base64 [comment]".
func ParseAuthorizedKeyLine(line string) (ssh.PublicKey, string, error) {
	line = strings.TrimSuffix(line, "\n")
	if strings.ContainsAny(line, "\r\n\x00") {
		return nil, "", fmt.Errorf("key must be a single line: %w", ErrInvalidArgument)
	}
	if len(line) > 16<<10 {
		return nil, "", fmt.Errorf("key line of %d bytes is too long: %w", len(line), ErrInvalidArgument)
	}
	pub, comment, options, rest, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		return nil, "", fmt.Errorf("parse public key: %v: %w", err, ErrInvalidArgument) //nolint:errorlint // the kind is ErrInvalidArgument
	}
	if len(options) > 0 {
		return nil, "", fmt.Errorf("key options %q are not accepted: %w", options, ErrInvalidArgument)
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, "", fmt.Errorf("more than one key given: %w", ErrInvalidArgument)
	}
	canonical := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
	if comment != "" {
		canonical += " " + comment
	}
	return pub, canonical, nil
}

// authorizeKey adds line to root's authorized_keys unless the same key is
// already there. It reports whether it added the key.
func (s *Server) authorizeKey(line string) (bool, error) {
	pub, canonical, err := ParseAuthorizedKeyLine(line)
	if err != nil {
		return false, err
	}
	s.keyMu.Lock()
	defer s.keyMu.Unlock()

	file := s.path(AuthorizedKeysFile)
	dir := filepath.Dir(file)
	if err := ensureDir(dir); err != nil {
		return false, err
	}
	existing, err := readRegular(file, maxAuthorizedBytes)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	want := pub.Marshal()
	for l := range bytes.SplitSeq(existing, []byte("\n")) {
		k, _, _, _, err := ssh.ParseAuthorizedKey(l)
		if err == nil && bytes.Equal(k.Marshal(), want) {
			// Present: make sure the modes are right anyway.
			if err := fixOwnerMode(file, 0o600); err != nil {
				return false, err
			}
			return false, nil
		}
	}
	content := existing
	if len(content) > 0 && content[len(content)-1] != '\n' {
		content = append(content, '\n')
	}
	content = append(content, canonical...)
	content = append(content, '\n')
	// Not synced: the boot waiter authorizes the key again at every boot,
	// so a write a guest crash loses (even as an empty file) is made good
	// at the next start, and the two fsyncs stay off the boot's path.
	if err := atomicfile.Replace(file, content, 0o600); err != nil {
		return false, err
	}
	return true, nil
}

// ensureDir makes dir (mode 0700, owned by root) or fixes an existing one;
// a symlink or non-directory there is an error.
func ensureDir(dir string) error {
	fi, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
			return fmt.Errorf("create %s: %w", filepath.Dir(dir), err)
		}
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("create %s: %w", dir, err)
		}
		fi, err = os.Lstat(dir)
	}
	if err != nil {
		return fmt.Errorf("stat %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory (mode %s)", dir, fi.Mode())
	}
	return fixOwnerMode(dir, 0o700)
}

// readRegular reads a regular file (not a symlink) of at most limit bytes.
func readRegular(path string, limit int64) ([]byte, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file (mode %s)", path, fi.Mode())
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("%s is %d bytes, more than %d", path, fi.Size(), limit)
	}
	b, err := os.ReadFile(path) //nolint:gosec // fixed guest path under the configured root
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}

func fixOwnerMode(path string, mode os.FileMode) error {
	if err := os.Chmod(path, mode); err != nil {
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	if os.Geteuid() == 0 {
		if err := os.Lchown(path, 0, 0); err != nil {
			return fmt.Errorf("chown %s: %w", path, err)
		}
	}
	return nil
}

// FindSerialPort returns the device of the virtio-serial port called name
// under root ("/" in a guest): /dev/virtio-ports/<name> where udev made that
// link, else /dev/<vportNpM> for the sysfs entry
// /sys/class/virtio-ports/vportNpM whose name file holds name. It returns
// ErrPortNotFound when neither exists.
func FindSerialPort(root, name string) (string, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return "", fmt.Errorf("invalid port name %q: %w", name, ErrInvalidArgument)
	}
	link := filepath.Join(root, "dev", "virtio-ports", name)
	if _, err := os.Stat(link); err == nil {
		return link, nil
	}
	class := filepath.Join(root, "sys", "class", "virtio-ports")
	entries, err := os.ReadDir(class)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("%s: %w", class, ErrPortNotFound)
		}
		return "", fmt.Errorf("list %s: %w", class, err)
	}
	for _, e := range entries {
		b, err := readLimited(filepath.Join(class, e.Name(), "name"), 256)
		if err != nil || strings.TrimSpace(string(b)) != name {
			continue
		}
		dev := filepath.Join(root, "dev", e.Name())
		if _, err := os.Stat(dev); err != nil {
			return "", fmt.Errorf("port %s is %s but %s is missing: %w", name, e.Name(), dev, ErrPortNotFound)
		}
		return dev, nil
	}
	return "", fmt.Errorf("no entry in %s is named %s: %w", class, name, ErrPortNotFound)
}

// RunSerial serves the virtio-serial port called name until ctx is done,
// waiting for the port to appear (its driver may load late) and reopening
// it after a failure. It checks every retry.
func (s *Server) RunSerial(ctx context.Context, name string, retry time.Duration) error {
	announced := false
	for {
		path, err := FindSerialPort(s.Root, name)
		if err == nil {
			announced = false
			err = s.serveSerialPath(ctx, path)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !errors.Is(err, ErrPortNotFound) || !announced {
			s.logf("serial port %s: %v (retrying every %s)", name, err, retry)
			announced = errors.Is(err, ErrPortNotFound)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(retry):
		}
	}
}

func (s *Server) serveSerialPath(ctx context.Context, path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0) //nolint:gosec // a device found by FindSerialPort
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	s.logf("serving on %s", path)
	return s.ServeStream(ctx, f)
}

// RunVsock serves AF_VSOCK port until ctx is done, waiting for /dev/vsock
// to appear and retrying a failed listen every retry.
func (s *Server) RunVsock(ctx context.Context, port uint32, retry time.Duration) error {
	announced := false
	for {
		var err error
		if _, statErr := os.Stat(filepath.Join(s.Root, "dev", "vsock")); statErr != nil {
			err = fmt.Errorf("no vsock device: %w", statErr)
		} else {
			var l net.Listener
			if l, err = ListenVsock(port); err == nil {
				s.logf("listening on %s", l.Addr())
				announced = false
				err = s.Serve(ctx, l)
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !announced {
			s.logf("vsock port %d: %v (retrying every %s)", port, err, retry)
			announced = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(retry):
		}
	}
}
