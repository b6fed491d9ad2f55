package imagepull

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// basicAuth wraps a registry so that it demands user:pass.
func basicAuth(user, pass string) func(http.Handler) http.Handler {
	return func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, "unauthorized", http.StatusUnauthorized)
				return
			}
			h.ServeHTTP(w, r)
		})
	}
}

func writeDockerConfig(t *testing.T, home, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(home, ".docker"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(home, ".docker", "config.json"), []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestUserKeychainPrivateRegistry(t *testing.T) {
	reg := newRegistry(t, basicAuth("alice", "s3cret"))
	// Push with the credentials, then pull as "the user".
	ref := reg.host + "/private/img:v1"
	tag, _ := name.ParseReference(ref)
	if err := remoteWriteAuth(tag, buildImage(t, "amd64", makeTar(t, file("secret", "data"))), &authn.Basic{Username: "alice", Password: "s3cret"}); err != nil {
		t.Fatal(err)
	}
	cache := &Cache{Dir: t.TempDir()}

	home := t.TempDir()
	if _, err := Pull(context.Background(), ref, PullOptions{Cache: cache, Keychain: UserKeychain(home)}); err == nil {
		t.Fatal("anonymous pull from a private registry succeeded")
	} else if strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("error leaks the password: %v", err)
	}

	auth := base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))
	writeDockerConfig(t, home, fmt.Sprintf(`{"auths": {"http://%s/": {"auth": %q}}}`, reg.host, auth))
	img, err := Pull(context.Background(), ref, PullOptions{Cache: cache, Keychain: UserKeychain(home)})
	if err != nil {
		t.Fatalf("Pull with ~/.docker/config.json credentials: %v", err)
	}
	staging := t.TempDir()
	if _, err := Flatten(context.Background(), img, staging, FlattenOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, staging, "secret"); got != "data" {
		t.Errorf("secret = %q", got)
	}

	// Wrong password: an error that does not echo it.
	bad := base64.StdEncoding.EncodeToString([]byte("alice:wrongpw"))
	writeDockerConfig(t, home, fmt.Sprintf(`{"auths": {%q: {"auth": %q}}}`, reg.host, bad))
	if _, err := Pull(context.Background(), ref, PullOptions{Cache: cache, Keychain: UserKeychain(home)}); err == nil || strings.Contains(err.Error(), "wrongpw") {
		t.Errorf("Pull with a wrong password = %v; want an error without the password", err)
	}
}

func TestUserKeychainRefusesSymlinkedConfig(t *testing.T) {
	home := t.TempDir()
	other := t.TempDir()
	writeDockerConfig(t, other, `{"auths": {"r.example": {"username": "u", "password": "p"}}}`)
	if err := os.Symlink(filepath.Join(other, ".docker"), filepath.Join(home, ".docker")); err != nil {
		t.Fatal(err)
	}
	reg, _ := name.NewRegistry("r.example")
	if _, err := UserKeychain(home).Resolve(reg); err == nil {
		t.Error("Resolve followed a symlinked ~/.docker")
	}
}

func TestUserKeychainCredentialHelper(t *testing.T) {
	home := t.TempDir()
	bin := t.TempDir()
	// A helper that answers for one server and records its environment.
	script := `#!/bin/sh
read -r server
env > "$HOME/helper-env"
if [ "$server" = "r.example" ]; then
  printf '{"ServerURL":"r.example","Username":"bob","Secret":"hunter2"}'
else
  echo "credentials not found in native keychain"; exit 1
fi
`
	if err := os.WriteFile(filepath.Join(bin, "docker-credential-testhelper"), []byte(script), 0o755); err != nil { //nolint:gosec // test helper must be executable
		t.Fatal(err)
	}
	writeDockerConfig(t, home, `{"credsStore": "testhelper", "credHelpers": {"evil.example": "../../bin/sh"}}`)
	kc := &userKeychain{home: home, path: bin}
	reg, _ := name.NewRegistry("r.example")
	a, err := kc.Resolve(reg)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := a.Authorization()
	if err != nil || cfg.Username != "bob" || cfg.Password != "hunter2" {
		t.Errorf("helper credentials = %+v, %v", cfg, err)
	}
	env, _ := os.ReadFile(filepath.Join(home, "helper-env"))
	for _, line := range strings.Split(strings.TrimSpace(string(env)), "\n") {
		k, _, _ := strings.Cut(line, "=")
		if line == "" {
			continue
		}
		switch k {
		case "PATH", "HOME", "PWD", "SHLVL", "_":
		default:
			t.Errorf("helper saw the daemon's environment: %s", line)
		}
	}
	other, _ := name.NewRegistry("other.example")
	if a, err := kc.Resolve(other); err != nil || a != authn.Anonymous {
		t.Errorf("unknown server: %v, %v; want anonymous", a, err)
	}
	evil, _ := name.NewRegistry("evil.example")
	if _, err := kc.Resolve(evil); err == nil {
		t.Error("a helper name with a path was accepted")
	}
}

func remoteWriteAuth(ref name.Reference, img v1.Image, a authn.Authenticator) error {
	return remote.Write(ref, img, remote.WithAuth(a))
}
