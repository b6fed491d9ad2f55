package imagepull

import (
	"errors"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/model"
)

func TestDefaultImageName(t *testing.T) {
	digest := "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	for _, tc := range []struct{ ref, want string }{
		{"docker.io/library/debian:bookworm", "debian-bookworm"},
		{"debian:bookworm", "debian-bookworm"},
		{"ghcr.io/myorg/devimg:v2", "devimg-v2"},
		{"alpine", "alpine-latest"},
		{"127.0.0.1:5000/a/b/c:Tag_1.2", "c-tag_1.2"},
		{"docker.io/library/alpine@" + digest, "alpine-0123456789ab"},
		{"ghcr.io/x/" + strings.Repeat("r", 80) + ":v1", strings.Repeat("r", model.MaxNameLen-3) + "-v1"},
		{"ghcr.io/x/r:" + strings.Repeat("T", 100), "r-" + strings.Repeat("t", model.MaxNameLen-2)},
		{"ghcr.io/x/__r:_x", "r-_x"},
	} {
		ref, err := ParseReference(tc.ref)
		if err != nil {
			t.Fatalf("ParseReference(%q): %v", tc.ref, err)
		}
		got := DefaultImageName(ref)
		if got != tc.want {
			t.Errorf("DefaultImageName(%q) = %q, want %q", tc.ref, got, tc.want)
		}
		if err := model.ValidateName("image", got); err != nil {
			t.Errorf("DefaultImageName(%q) = %q fails validation: %v", tc.ref, got, err)
		}
	}
}

func TestIsCatalogName(t *testing.T) {
	for s, want := range map[string]bool{
		"debian-bookworm": true, "alpine": true, "": false,
		"debian:bookworm": false, "docker.io/library/debian:bookworm": false, "library/debian": false,
		"alpine@sha256:" + strings.Repeat("0", 64): false, "localhost:5000/x": false,
	} {
		if got := IsCatalogName(s); got != want {
			t.Errorf("IsCatalogName(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestParseReferenceRejects(t *testing.T) {
	for _, s := range []string{"", " debian:x", "debian:x\n", "a\x00b", "Debian/X:y", "x:y:z:w", "reg.io/x@sha256:short", "héllo:1", strings.Repeat("a/", 300) + "x"} {
		if _, err := ParseReference(s); !errors.Is(err, ErrInvalidReference) {
			t.Errorf("ParseReference(%q) = %v, want ErrInvalidReference", s, err)
		}
	}
	ref, err := ParseReference("localhost:5000/x:v1")
	if err != nil || ref.Context().Scheme() != "http" {
		t.Errorf("localhost reference: %v, scheme %q; want plain http", err, ref.Context().Scheme())
	}
	ref, err = ParseReference("127.0.0.1:5000/x:v1")
	if err != nil || ref.Context().Scheme() != "http" {
		t.Errorf("127.0.0.1 reference: %v; want plain http", err)
	}
	ref, err = ParseReference("ghcr.io/x:v1")
	if err != nil || ref.Context().Scheme() != "https" {
		t.Errorf("ghcr.io reference: %v; want https", err)
	}
}
