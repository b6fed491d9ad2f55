package imagepull

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"golang.org/x/sys/unix"
)

// helperPATH is the PATH credential helpers are looked up in and run with:
// the system directories, never the daemon's or the user's environment.
const helperPATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// maxDockerConfig bounds the size of a user's ~/.docker/config.json.
const maxDockerConfig = 1 << 20

var helperNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// UserKeychain returns a keychain that reads registry credentials the way
// docker does, but for the user whose home directory is homeDir rather than
// for the process: <homeDir>/.docker/config.json ("auths" entries, and the
// "credsStore" / "credHelpers" credential helpers). It never consults the
// daemon's environment (DOCKER_CONFIG, HOME, XDG_*, REGISTRY_AUTH_FILE).
//
// The daemon runs as root and the file belongs to a user, so it is read
// defensively: no symlink anywhere below homeDir is followed, it must be a
// regular file owned by homeDir's owner, at most 1 MiB. A credential helper
// is found as docker-credential-<name> in the system PATH only, with a
// validated name, and runs as homeDir's owner with an environment holding
// just PATH and HOME. A missing config file or entry means anonymous access.
// Credentials are never logged or put in errors.
func UserKeychain(homeDir string) authn.Keychain {
	return &userKeychain{home: homeDir, path: helperPATH}
}

type userKeychain struct {
	home string
	path string // PATH for credential helpers; tests point it elsewhere
}

// dockerConfig is the part of ~/.docker/config.json banger reads.
type dockerConfig struct {
	Auths       map[string]dockerAuth `json:"auths"`
	CredsStore  string                `json:"credsStore"`
	CredHelpers map[string]string     `json:"credHelpers"`
}

type dockerAuth struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
	RegistryToken string `json:"registrytoken"`
}

// Resolve implements authn.Keychain.
func (k *userKeychain) Resolve(target authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), target)
}

// ResolveContext implements authn.ContextKeychain.
func (k *userKeychain) ResolveContext(ctx context.Context, target authn.Resource) (authn.Authenticator, error) {
	cfg, uid, gid, err := k.load()
	if err != nil || cfg == nil {
		return authn.Anonymous, err
	}
	host := target.RegistryStr()
	serverURL := host
	if host == name.DefaultRegistry || host == "docker.io" {
		host, serverURL = name.DefaultRegistry, authn.DefaultAuthKey
	}
	if helper := cfg.CredHelpers[host]; helper != "" {
		return k.runHelper(ctx, helper, serverURL, uid, gid)
	}
	for key, a := range cfg.Auths {
		if configHost(key) != host {
			continue
		}
		ac := authn.AuthConfig{Username: a.Username, Password: a.Password, IdentityToken: a.IdentityToken, RegistryToken: a.RegistryToken}
		if a.Auth != "" {
			dec, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return nil, fmt.Errorf("docker config of %s: the \"auth\" entry for %s is not base64", k.home, key)
			}
			user, pass, ok := strings.Cut(string(dec), ":")
			if !ok {
				return nil, fmt.Errorf("docker config of %s: the \"auth\" entry for %s is not user:password", k.home, key)
			}
			ac.Username, ac.Password = user, pass
		}
		if ac != (authn.AuthConfig{}) {
			return authn.FromConfig(ac), nil
		}
	}
	if cfg.CredsStore != "" {
		return k.runHelper(ctx, cfg.CredsStore, serverURL, uid, gid)
	}
	return authn.Anonymous, nil
}

// configHost reduces an "auths" key ("https://index.docker.io/v1/",
// "registry.example.com:5000", "http://host/") to the registry host.
func configHost(key string) string {
	key = strings.TrimPrefix(strings.TrimPrefix(key, "https://"), "http://")
	key, _, _ = strings.Cut(key, "/")
	if key == "docker.io" || key == "registry-1.docker.io" {
		return name.DefaultRegistry
	}
	return key
}

// load reads <home>/.docker/config.json without following symlinks, and
// returns it with the uid and gid of the home directory's owner. A missing
// file gives a nil config.
func (k *userKeychain) load() (*dockerConfig, uint32, uint32, error) {
	if k.home == "" || !strings.HasPrefix(k.home, "/") {
		return nil, 0, 0, nil
	}
	homeFD, err := unix.Open(k.home, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, 0, 0, nil //nolint:nilerr // no usable home: anonymous
	}
	defer unix.Close(homeFD)
	var hst unix.Stat_t
	if err := unix.Fstat(homeFD, &hst); err != nil {
		return nil, 0, 0, fmt.Errorf("stat %s: %w", k.home, err)
	}
	fd, err := unix.Openat2(homeFD, ".docker/config.json", &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOFOLLOW | unix.O_NONBLOCK,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if errors.Is(err, unix.ENOENT) {
		return nil, 0, 0, nil
	}
	if err != nil {
		return nil, 0, 0, fmt.Errorf("open %s/.docker/config.json (symlinks are not followed): %w", k.home, err)
	}
	f := os.NewFile(uintptr(fd), k.home+"/.docker/config.json")
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, 0, 0, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Uid != hst.Uid {
		return nil, 0, 0, fmt.Errorf("%s is not a regular file owned by the owner of %s", f.Name(), k.home)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxDockerConfig+1))
	if err != nil {
		return nil, 0, 0, fmt.Errorf("read %s: %w", f.Name(), err)
	}
	if len(data) > maxDockerConfig {
		return nil, 0, 0, fmt.Errorf("%s is larger than %d bytes", f.Name(), maxDockerConfig)
	}
	var cfg dockerConfig
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, 0, 0, fmt.Errorf("%s is not valid JSON", f.Name())
	}
	return &cfg, hst.Uid, hst.Gid, nil
}

// runHelper asks docker-credential-<helper> for serverURL's credentials.
func (k *userKeychain) runHelper(ctx context.Context, helper, serverURL string, uid, gid uint32) (authn.Authenticator, error) {
	if !helperNameRE.MatchString(helper) {
		return nil, fmt.Errorf("docker config of %s names an invalid credential helper %q", k.home, helper)
	}
	prog := "docker-credential-" + helper
	var path string
	for _, dir := range strings.Split(k.path, ":") {
		p := dir + "/" + prog
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			path = p
			break
		}
	}
	if path == "" {
		return nil, fmt.Errorf("credential helper %s (from the docker config of %s) is not installed in %s", prog, k.home, k.path)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, "get")
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=" + k.path, "HOME=" + k.home}
	cmd.Stdin = strings.NewReader(serverURL)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if os.Geteuid() == 0 && uid != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	}
	if err := cmd.Run(); err != nil {
		// docker-credential-helpers print this when there is no entry.
		if strings.Contains(stdout.String(), "credentials not found") {
			return authn.Anonymous, nil
		}
		// The output may hold secrets: report the exit status only.
		return nil, fmt.Errorf("credential helper %s for %s failed: %w", prog, serverURL, err)
	}
	var out struct {
		Username string `json:"Username"`
		Secret   string `json:"Secret"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		return nil, fmt.Errorf("credential helper %s for %s printed invalid JSON", prog, serverURL)
	}
	if out.Username == "<token>" {
		return authn.FromConfig(authn.AuthConfig{IdentityToken: out.Secret}), nil
	}
	return authn.FromConfig(authn.AuthConfig{Username: out.Username, Password: out.Secret}), nil
}
