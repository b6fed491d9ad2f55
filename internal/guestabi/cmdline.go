package guestabi

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path"
	"strconv"
	"strings"
	"time"
)

// Kernel command-line keys banger owns. The standard keys root=,
// rootfstype=, rootflags=, ro, rw and init= are read too.
const (
	KeyIP       = "banger.ip"       // <addr>/<prefix>: the VM's address and subnet
	KeyGateway  = "banger.gw"       // <addr>: the default route
	KeyDNS      = "banger.dns"      // <addr>[,<addr>...]: resolv.conf's servers
	KeyHostname = "banger.hostname" // the guest hostname
	KeyMAC      = "banger.mac"      // which interface carries KeyIP
	KeyRootWait = "banger.rootwait" // seconds the initramfs waits for root=
	KeyDebug    = "banger.debug"    // the initramfs prints each step
	KeyNoEgress = "banger.noegress" // the host has no route out: nothing beyond it is reachable
	KeyInit     = "banger.init"     // auto, image or banger (Init)
	KeyMain     = "banger.main"     // MainOverride, JSON in unpadded base64url
	KeyMounts   = "banger.mounts"   // []BootMount, JSON in unpadded base64url
)

// Defaults the guest applies when a key is absent.
const (
	DefaultRoot       = "/dev/vda"
	DefaultRootFSType = "ext4"
	DefaultImageInit  = "/sbin/init"
	DefaultRootWait   = 10 * time.Second
	maxRootWait       = time.Hour
)

// MaxCmdline is the longest kernel command line x86 Linux accepts
// (COMMAND_LINE_SIZE), terminating NUL excluded.
const MaxCmdline = 2047

// ErrCmdline marks a kernel command line, or a Cmdline, that is malformed.
var ErrCmdline = errors.New("invalid kernel command line")

// Cmdline is the guest kernel command line as banger writes and reads it.
// The zero value of a field means its key is absent.
type Cmdline struct {
	// Kernel holds the words banger does not interpret (console=ttyS0,
	// panic=-1, quiet...), in order. Encode writes them first.
	Kernel []string

	Root       string // root=, a /dev/ path
	RootFSType string // rootfstype=
	RootFlags  string // rootflags=
	ReadWrite  bool   // rw (absent or ro: read-only)
	Init       string // init=, absolute
	// InitArgs are the words after "--", passed to init.
	InitArgs []string

	Network  Network
	Hostname string
	RootWait time.Duration // 0: DefaultRootWait
	Debug    bool
	// NoEgress says the host has no route out (no default route), so the
	// guest reaches nothing beyond the host: banger's PID 1 skips first
	// boot's install at once instead of probing a mirror.
	NoEgress bool
	// InitChoice is banger.init; "" means InitAuto.
	InitChoice Init
	// Main changes the image's main process; the zero value changes nothing.
	Main MainOverride
	// Mounts are the host folders (vm create --mount) the guest mounts at
	// boot, before any service or the main process starts; the host
	// serves them once the agent is up.
	Mounts []BootMount
}

// BootMount is a host folder's place in the guest: its guest path and
// whether it is read-only. The host path stays on the host.
type BootMount struct {
	Dir      string `json:"dir"`
	ReadOnly bool   `json:"ro,omitempty"`
}

// checkBootMounts accepts clean absolute guest paths other than "/", free
// of control bytes, each at most once.
func checkBootMounts(ms []BootMount) error {
	seen := map[string]bool{}
	for _, m := range ms {
		if !strings.HasPrefix(m.Dir, "/") || m.Dir == "/" || path.Clean(m.Dir) != m.Dir || len(m.Dir) > 4096 {
			return fmt.Errorf("%w: %s: guest folder %q is not a clean absolute path other than /", ErrCmdline, KeyMounts, m.Dir)
		}
		for i := 0; i < len(m.Dir); i++ {
			if b := m.Dir[i]; b < 0x20 || b == 0x7f {
				return fmt.Errorf("%w: %s: guest folder %q holds a control byte", ErrCmdline, KeyMounts, m.Dir)
			}
		}
		if seen[m.Dir] {
			return fmt.Errorf("%w: %s: guest folder %q twice", ErrCmdline, KeyMounts, m.Dir)
		}
		seen[m.Dir] = true
	}
	return nil
}

// Network is the guest's address, set up from the command line because
// distribution kernels have no CONFIG_IP_PNP.
type Network struct {
	Address netip.Prefix // banger.ip; invalid: no network setup
	Gateway netip.Addr   // banger.gw
	DNS     []netip.Addr // banger.dns
	MAC     net.HardwareAddr
}

// Configured reports whether the command line asks for a network setup.
func (n Network) Configured() bool { return n.Address.IsValid() }

// Encode returns the command line as the kernel takes it. It fails with
// ErrCmdline when a value cannot be written safely (spaces, quotes or
// control bytes; a relative path; a bad hostname) or the result is longer
// than MaxCmdline.
func (c Cmdline) Encode() (string, error) {
	var w []string
	for _, k := range c.Kernel {
		if err := plainWord(k); err != nil {
			return "", fmt.Errorf("%w: word %q: %w", ErrCmdline, k, err)
		}
		if k == "--" {
			return "", fmt.Errorf("%w: a kernel word is \"--\"", ErrCmdline)
		}
		w = append(w, k)
	}
	add := func(key, val string) error {
		if err := plainWord(val); err != nil {
			return fmt.Errorf("%w: %s=%q: %w", ErrCmdline, key, val, err)
		}
		w = append(w, key+"="+val)
		return nil
	}
	var errs []error
	if c.Root != "" {
		errs = append(errs, checkRoot(c.Root), add("root", c.Root))
	}
	if c.RootFSType != "" {
		errs = append(errs, add("rootfstype", c.RootFSType))
	}
	if c.RootFlags != "" {
		errs = append(errs, add("rootflags", c.RootFlags))
	}
	if c.ReadWrite {
		w = append(w, "rw")
	}
	if c.Init != "" {
		errs = append(errs, checkAbs("init", c.Init), add("init", c.Init))
	}
	if n := c.Network; n.Configured() {
		errs = append(errs, add(KeyIP, n.Address.String()))
		if n.Gateway.IsValid() {
			errs = append(errs, add(KeyGateway, n.Gateway.String()))
		}
	} else if n.Gateway.IsValid() {
		errs = append(errs, fmt.Errorf("%w: %s without %s", ErrCmdline, KeyGateway, KeyIP))
	}
	if len(c.Network.DNS) > 0 {
		s := make([]string, len(c.Network.DNS))
		for i, a := range c.Network.DNS {
			s[i] = a.String()
		}
		errs = append(errs, add(KeyDNS, strings.Join(s, ",")))
	}
	if len(c.Network.MAC) > 0 {
		errs = append(errs, add(KeyMAC, c.Network.MAC.String()))
	}
	if c.Hostname != "" {
		errs = append(errs, CheckHostname(c.Hostname), add(KeyHostname, c.Hostname))
	}
	if c.RootWait != 0 {
		if c.RootWait < 0 || c.RootWait > maxRootWait {
			errs = append(errs, fmt.Errorf("%w: %s %s out of range", ErrCmdline, KeyRootWait, c.RootWait))
		}
		errs = append(errs, add(KeyRootWait, strconv.FormatFloat(c.RootWait.Seconds(), 'f', -1, 64)))
	}
	if c.Debug {
		w = append(w, KeyDebug)
	}
	if c.NoEgress {
		w = append(w, KeyNoEgress)
	}
	if c.InitChoice != "" {
		if !c.InitChoice.Valid() {
			errs = append(errs, fmt.Errorf("%w: %s=%q: want auto, image or banger", ErrCmdline, KeyInit, c.InitChoice))
		}
		errs = append(errs, add(KeyInit, string(c.InitChoice)))
	}
	if !c.Main.Empty() {
		b, err := json.Marshal(c.Main)
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: %s: %w", ErrCmdline, KeyMain, err))
		}
		errs = append(errs, add(KeyMain, base64.RawURLEncoding.EncodeToString(b)))
	}
	if len(c.Mounts) > 0 {
		b, err := json.Marshal(c.Mounts)
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: %s: %w", ErrCmdline, KeyMounts, err))
		}
		errs = append(errs, checkBootMounts(c.Mounts), add(KeyMounts, base64.RawURLEncoding.EncodeToString(b)))
	}
	if len(c.InitArgs) > 0 {
		w = append(w, "--")
		for _, a := range c.InitArgs {
			if err := plainWord(a); err != nil {
				errs = append(errs, fmt.Errorf("%w: init argument %q: %w", ErrCmdline, a, err))
			}
			w = append(w, a)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return "", err
	}
	s := strings.Join(w, " ")
	if len(s) > MaxCmdline {
		return "", fmt.Errorf("%w: %d bytes, the kernel takes at most %d (shorten --cmd or --env)", ErrCmdline, len(s), MaxCmdline)
	}
	return s, nil
}

// Parse reads a kernel command line (the content of /proc/cmdline). Values
// may be double-quoted, as the kernel allows. Words banger does not know go
// to Kernel; a malformed value of a key banger owns is an error wrapping
// ErrCmdline. Later words override earlier ones, as in the kernel.
func Parse(s string) (Cmdline, error) {
	var c Cmdline
	words := splitWords(s)
	var errs []error
	bad := func(key, val string, why string) {
		errs = append(errs, fmt.Errorf("%w: %s=%q: %s", ErrCmdline, key, val, why))
	}
	for i, word := range words {
		if word == "--" {
			c.InitArgs = append([]string(nil), words[i+1:]...)
			break
		}
		key, val, hasVal := strings.Cut(word, "=")
		switch key {
		case "root":
			c.Root = val
			if err := checkRoot(val); err != nil {
				errs = append(errs, err)
			}
		case "rootfstype":
			c.RootFSType = val
		case "rootflags":
			c.RootFlags = val
		case "ro":
			c.ReadWrite = false
		case "rw":
			c.ReadWrite = true
		case "init":
			c.Init = val
			if err := checkAbs("init", val); err != nil {
				errs = append(errs, err)
			}
		case KeyIP:
			p, err := netip.ParsePrefix(val)
			if err != nil || !p.Addr().Is4() {
				bad(key, val, "want an IPv4 address with a /prefix")
				continue
			}
			c.Network.Address = p
		case KeyGateway:
			a, err := netip.ParseAddr(val)
			if err != nil || !a.Is4() {
				bad(key, val, "want an IPv4 address")
				continue
			}
			c.Network.Gateway = a
		case KeyDNS:
			c.Network.DNS = nil
			for _, f := range strings.Split(val, ",") {
				a, err := netip.ParseAddr(f)
				if err != nil {
					bad(key, val, "want comma-separated IP addresses")
					c.Network.DNS = nil
					break
				}
				c.Network.DNS = append(c.Network.DNS, a)
			}
		case KeyMAC:
			m, err := net.ParseMAC(val)
			if err != nil || len(m) != 6 {
				bad(key, val, "want a MAC address aa:bb:cc:dd:ee:ff")
				continue
			}
			c.Network.MAC = m
		case KeyHostname:
			if err := CheckHostname(val); err != nil {
				errs = append(errs, err)
				continue
			}
			c.Hostname = val
		case KeyRootWait:
			secs, err := strconv.ParseFloat(val, 64)
			d := time.Duration(secs * float64(time.Second))
			if err != nil || secs < 0 || d > maxRootWait {
				bad(key, val, "want seconds between 0 and 3600")
				continue
			}
			c.RootWait = d
		case KeyDebug:
			c.Debug = !hasVal || (val != "0" && val != "false")
		case KeyNoEgress:
			c.NoEgress = !hasVal || (val != "0" && val != "false")
		case KeyInit:
			if !Init(val).Valid() {
				bad(key, val, "want auto, image or banger")
				continue
			}
			c.InitChoice = Init(val)
		case KeyMain:
			b, err := base64.RawURLEncoding.DecodeString(val)
			var m MainOverride
			if err == nil {
				err = json.Unmarshal(b, &m)
			}
			if err != nil {
				bad(key, val, "want unpadded base64url of a JSON object: "+err.Error())
				continue
			}
			c.Main = m
		case KeyMounts:
			b, err := base64.RawURLEncoding.DecodeString(val)
			var ms []BootMount
			if err == nil {
				err = json.Unmarshal(b, &ms)
			}
			if err == nil {
				err = checkBootMounts(ms)
			}
			if err != nil {
				bad(key, val, "want unpadded base64url of a JSON list of {\"dir\":...,\"ro\":...}: "+err.Error())
				continue
			}
			c.Mounts = ms
		default:
			c.Kernel = append(c.Kernel, word)
		}
	}
	return c, errors.Join(errs...)
}

// RootDevice is root=, or DefaultRoot.
func (c Cmdline) RootDevice() string { return or(c.Root, DefaultRoot) }

// FSType is rootfstype=, or DefaultRootFSType.
func (c Cmdline) FSType() string { return or(c.RootFSType, DefaultRootFSType) }

// RootWaitOrDefault is banger.rootwait=, or DefaultRootWait.
func (c Cmdline) RootWaitOrDefault() time.Duration {
	if c.RootWait == 0 {
		return DefaultRootWait
	}
	return c.RootWait
}

// Choice is banger.init=, or InitAuto.
func (c Cmdline) Choice() Init {
	if c.InitChoice == "" {
		return InitAuto
	}
	return c.InitChoice
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// CheckHostname accepts an RFC 1123 host name: dot-separated labels of
// letters, digits and inner hyphens, 63 bytes each, 253 in all.
func CheckHostname(h string) error {
	bad := func(why string) error {
		return fmt.Errorf("%w: %s=%q: %s", ErrCmdline, KeyHostname, h, why)
	}
	if h == "" || len(h) > 253 {
		return bad("want 1 to 253 bytes")
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 {
			return bad("each dot-separated label needs 1 to 63 bytes")
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return bad("a label may not start or end with '-'")
		}
		for _, r := range label {
			if (r < 'a' || r > 'z') && (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '-' {
				return bad("only letters, digits, '-' and '.' are allowed")
			}
		}
	}
	return nil
}

func checkRoot(root string) error {
	if !strings.HasPrefix(root, "/dev/") || strings.Contains(root, "..") {
		return fmt.Errorf("%w: root=%q: only /dev/<name> device paths are supported (no udev for UUID= or LABEL=)", ErrCmdline, root)
	}
	return nil
}

func checkAbs(key, p string) error {
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("%w: %s=%q: must be an absolute path", ErrCmdline, key, p)
	}
	return nil
}

// plainWord refuses what cannot sit in one unquoted command-line word.
func plainWord(s string) error {
	if s == "" {
		return errors.New("empty")
	}
	for i := 0; i < len(s); i++ {
		if b := s[i]; b <= ' ' || b == '"' || b == 0x7f {
			return errors.New("spaces, quotes and control bytes are not allowed")
		}
	}
	return nil
}

// splitWords splits as the kernel does: on spaces outside double quotes,
// dropping the quotes.
func splitWords(s string) []string {
	var words []string
	var cur strings.Builder
	inQuote, have := false, false
	for _, r := range s {
		switch {
		case r == '"':
			inQuote = !inQuote
			have = true
		case (r == ' ' || r == '\n' || r == '\t') && !inQuote:
			if have {
				words = append(words, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteRune(r)
			have = true
		}
	}
	if have {
		words = append(words, cur.String())
	}
	return words
}
