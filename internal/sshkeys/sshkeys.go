// Package sshkeys manages the host side of `banger ssh`: the ed25519
// keypair banger keeps for each host user, the known_hosts file that pins a
// VM's host key (as the guest agent reported it), and the ssh command line
// that uses both. Host keys are checked strictly: there is no
// StrictHostKeyChecking=no anywhere.
package sshkeys

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// Sentinel errors; test with errors.Is.
var (
	// ErrInsecureKey: an existing private key file is readable or writable
	// by others, or is not a regular file.
	ErrInsecureKey = errors.New("insecure ssh private key file")
	// ErrInvalid: an argument (host key, alias, user, path) was rejected.
	ErrInvalid = errors.New("invalid ssh argument")
)

// KeyPair is a user's banger SSH keypair on disk.
type KeyPair struct {
	// PrivateKeyPath is the OpenSSH-format private key (mode 0600).
	PrivateKeyPath string
	// PublicKeyPath is PrivateKeyPath + ".pub" (mode 0644).
	PublicKeyPath string
	// AuthorizedKey is the public key as one authorized_keys line
	// ("ssh-ed25519 AAAA... comment"), ready for agent.Client.AuthorizeKey.
	AuthorizedKey string
	// Signer signs with the private key.
	Signer ssh.Signer
}

// Owner is who a created key file should belong to (the daemon runs as
// root and keeps keys for other users).
type Owner struct {
	UID, GID int
}

// Options tune Ensure.
type Options struct {
	// Comment is stored in a new key and its .pub line.
	Comment string
	// Owner, when set, is applied to created files and directories.
	Owner *Owner
}

// Ensure returns the keypair at path, creating it when absent: an ed25519
// key in OpenSSH format, mode 0600, created atomically (written to a temp
// file, synced, then linked into place, so a concurrent caller either
// sees no key or the whole key, and the first writer wins). The parent
// directory is created with mode 0700 if missing. An existing key with
// wider permissions than 0600 is refused with ErrInsecureKey. The .pub
// file is (re)written when missing or different.
func Ensure(path string, opts Options) (*KeyPair, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("ssh key path %q is not absolute: %w", path, ErrInvalid)
	}
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("create key directory %s: %w", dir, err)
		}
		if err := chown(dir, opts.Owner); err != nil {
			return nil, err
		}
	}
	pemBytes, err := readPrivate(path)
	if errors.Is(err, fs.ErrNotExist) {
		if err := create(path, opts); err != nil {
			return nil, err
		}
		pemBytes, err = readPrivate(path)
	}
	if err != nil {
		return nil, err
	}
	signer, err := ssh.ParsePrivateKey(pemBytes)
	if err != nil {
		return nil, fmt.Errorf("parse ssh private key %s: %w", path, err)
	}
	kp := &KeyPair{PrivateKeyPath: path, PublicKeyPath: path + ".pub", Signer: signer}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey())))
	if opts.Comment != "" {
		line += " " + opts.Comment
	}
	kp.AuthorizedKey = line
	if err := ensurePublic(kp, opts.Owner); err != nil {
		return nil, err
	}
	return kp, nil
}

func readPrivate(path string) ([]byte, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("ssh private key %s is not a regular file (mode %s): %w", path, fi.Mode(), ErrInsecureKey)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("ssh private key %s has mode %o, want 0600 (fix with chmod 600): %w", path, fi.Mode().Perm(), ErrInsecureKey)
	}
	b, err := os.ReadFile(path) //nolint:gosec // the key path the caller chose
	if err != nil {
		return nil, fmt.Errorf("read ssh private key: %w", err)
	}
	return b, nil
}

// create writes a new key to a temp file and links it to path; if another
// process won the race, its key stays.
func create(path string, opts Options) (err error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate ed25519 key: %w", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, opts.Comment)
	if err != nil {
		return fmt.Errorf("encode ssh private key: %w", err)
	}
	tmp, err := writeTemp(path, pem.EncodeToMemory(block), 0o600, opts.Owner)
	if err != nil {
		return err
	}
	defer os.Remove(tmp) //nolint:errcheck // the temp name goes either way
	if err := os.Link(tmp, path); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("install ssh private key %s: %w", path, err)
	}
	return syncDir(filepath.Dir(path))
}

func ensurePublic(kp *KeyPair, owner *Owner) error {
	want := []byte(kp.AuthorizedKey + "\n")
	if got, err := os.ReadFile(kp.PublicKeyPath); err == nil && bytes.Equal(got, want) {
		return nil
	}
	return writeFileAtomic(kp.PublicKeyPath, want, 0o644, owner)
}

// KnownHostsLine returns the known_hosts line that pins hostKey (one
// authorized_keys-format public key, as the guest agent reports it; it is
// untrusted and validated here) under alias, the name ssh is told with
// HostKeyAlias.
func KnownHostsLine(alias, hostKey string) (string, error) {
	if err := validAlias(alias); err != nil {
		return "", err
	}
	hostKey = strings.TrimSuffix(hostKey, "\n")
	if strings.ContainsAny(hostKey, "\r\n\x00") {
		return "", fmt.Errorf("host key is not one line: %w", ErrInvalid)
	}
	pub, _, options, rest, err := ssh.ParseAuthorizedKey([]byte(hostKey))
	if err != nil {
		return "", fmt.Errorf("parse host key for %s: %v: %w", alias, err, ErrInvalid) //nolint:errorlint // the kind is ErrInvalid
	}
	if len(options) > 0 || len(bytes.TrimSpace(rest)) > 0 {
		return "", fmt.Errorf("host key for %s has options or extra keys: %w", alias, ErrInvalid)
	}
	return knownhosts.Line([]string{alias}, pub), nil
}

// WriteKnownHosts atomically writes a known_hosts file at path holding only
// the pin of hostKey for alias (see KnownHostsLine), mode 0600.
func WriteKnownHosts(path, alias, hostKey string) error {
	line, err := KnownHostsLine(alias, hostKey)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, []byte(line+"\n"), 0o600, nil)
}

// SSHOptions are the inputs of Command.
type SSHOptions struct {
	// User to log in as, e.g. "root".
	User string
	// IP is the VM's address.
	IP string
	// Port is the SSH port; 0 means 22.
	Port int
	// KeyPath is the private key (KeyPair.PrivateKeyPath).
	KeyPath string
	// KnownHostsPath is the file WriteKnownHosts wrote.
	KnownHostsPath string
	// Alias is the HostKeyAlias the known_hosts pin was written for
	// (the VM's name).
	Alias string
	// Command, when not empty, runs instead of a login shell. As with ssh
	// itself, the words are joined with spaces and run by the remote
	// user's shell.
	Command []string
	// Proxy, when not empty, is the argv of a ProxyCommand that carries the
	// connection (banger ssh --stdio): IP is then not used and may be
	// empty. Every word must be free of quotes and control characters.
	Proxy []string
}

// Command returns the argv (argv[0] is "ssh") that connects to the VM with
// banger's key and the pinned host key only: no agent keys, no user
// known_hosts, no password prompts, and StrictHostKeyChecking=yes.
func Command(o SSHOptions) ([]string, error) {
	if !userRE.MatchString(o.User) {
		return nil, fmt.Errorf("ssh user %q: %w", o.User, ErrInvalid)
	}
	dest := o.Alias
	if len(o.Proxy) == 0 {
		ip, err := netip.ParseAddr(o.IP)
		if err != nil || ip.Zone() != "" {
			return nil, fmt.Errorf("ssh address %q is not an IP address: %w", o.IP, ErrInvalid)
		}
		dest = ip.String()
	}
	if o.Port < 0 || o.Port > 65535 {
		return nil, fmt.Errorf("ssh port %d: %w", o.Port, ErrInvalid)
	}
	if err := validAlias(o.Alias); err != nil {
		return nil, err
	}
	key, err := optionPath("key", o.KeyPath)
	if err != nil {
		return nil, err
	}
	kh, err := optionPath("known_hosts", o.KnownHostsPath)
	if err != nil {
		return nil, err
	}
	port := o.Port
	if port == 0 {
		port = 22
	}
	argv := []string{
		"ssh",
		"-i", key,
		"-o", "IdentitiesOnly=yes",
		"-o", "IdentityAgent=none",
		"-o", "UserKnownHostsFile=" + kh,
		"-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "StrictHostKeyChecking=yes",
		"-o", "HostKeyAlias=" + o.Alias,
		"-o", "CheckHostIP=no",
		"-o", "UpdateHostKeys=no",
		"-o", "BatchMode=yes",
		"-o", "PasswordAuthentication=no",
		"-o", "LogLevel=ERROR",
		"-p", fmt.Sprint(port),
		"-l", o.User,
	}
	if len(o.Proxy) > 0 {
		pc, err := ProxyCommandLine(o.Proxy)
		if err != nil {
			return nil, err
		}
		argv = append(argv, "-o", "ProxyCommand="+pc)
	}
	argv = append(argv, "--", dest)
	return append(argv, o.Command...), nil
}

// ProxyCommandLine quotes argv for an ssh ProxyCommand (run by a shell):
// every word in single quotes, '%' doubled since ssh expands %-tokens.
// Words with quotes, backslashes or control characters are refused. A word
// that is exactly "%n" stays a token (the host name as given to ssh).
func ProxyCommandLine(argv []string) (string, error) {
	words := make([]string, len(argv))
	for i, w := range argv {
		if w == "%n" {
			words[i] = w
			continue
		}
		if w == "" || strings.ContainsFunc(w, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '\'' || r == '"' || r == '\\' }) {
			return "", fmt.Errorf("proxy command word %q: %w", w, ErrInvalid)
		}
		words[i] = "'" + strings.ReplaceAll(w, "%", "%%") + "'"
	}
	return strings.Join(words, " "), nil
}

var (
	userRE  = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)
	aliasRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
)

func validAlias(alias string) error {
	if !aliasRE.MatchString(alias) {
		return fmt.Errorf("host key alias %q (want letters, digits, '.', '_', '-'): %w", alias, ErrInvalid)
	}
	return nil
}

// optionPath checks a path for use in an ssh -o value or -i argument: it
// must be absolute, without whitespace, quotes or control characters (ssh
// splits such values), and '%' is escaped because ssh expands %-tokens.
func optionPath(what, p string) (string, error) {
	if !filepath.IsAbs(p) || strings.ContainsFunc(p, func(r rune) bool {
		return r <= ' ' || r == 0x7f || r == '"' || r == '\'' || r == '\\'
	}) {
		return "", fmt.Errorf("%s path %q must be absolute, without spaces, quotes or control characters: %w", what, p, ErrInvalid)
	}
	return strings.ReplaceAll(p, "%", "%%"), nil
}

func chown(path string, o *Owner) error {
	if o == nil {
		return nil
	}
	if err := os.Lchown(path, o.UID, o.GID); err != nil {
		return fmt.Errorf("chown %s to %d:%d: %w", path, o.UID, o.GID, err)
	}
	return nil
}

// writeTemp writes content to a new temp file next to path, synced, with
// mode and owner, and returns its name.
func writeTemp(path string, content []byte, mode os.FileMode, owner *Owner) (name string, err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	if err = f.Chmod(mode); err != nil {
		return "", fmt.Errorf("chmod %s: %w", f.Name(), err)
	}
	if err = chown(f.Name(), owner); err != nil {
		return "", err
	}
	if _, err = f.Write(content); err != nil {
		return "", fmt.Errorf("write %s: %w", f.Name(), err)
	}
	if err = f.Sync(); err != nil {
		return "", fmt.Errorf("sync %s: %w", f.Name(), err)
	}
	if err = f.Close(); err != nil {
		return "", fmt.Errorf("close %s: %w", f.Name(), err)
	}
	return f.Name(), nil
}

func writeFileAtomic(path string, content []byte, mode os.FileMode, owner *Owner) error {
	tmp, err := writeTemp(path, content, mode, owner)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("install %s: %w", path, err)
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir) //nolint:gosec // the directory of a path the caller chose
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
