package imagepull

import (
	"errors"
	"fmt"
	"strings"

	"github.com/bangerdev/banger/internal/model"
	"github.com/google/go-containerregistry/pkg/name"
)

// ErrInvalidReference is wrapped by ParseReference for every reference it
// refuses.
var ErrInvalidReference = errors.New("invalid image reference")

// maxRefLen bounds a reference before it is parsed. Docker's own limit on a
// repository name is 255 bytes; a tag is at most 128 and a digest 71.
const maxRefLen = 512

// ParseReference parses an OCI image reference such as
// "docker.io/library/debian:bookworm", "ghcr.io/org/img@sha256:..." or
// "127.0.0.1:5000/test:v1". A reference without a tag gets ":latest", one
// without a registry gets Docker Hub, as docker does. Registries on
// localhost, 127.0.0.0/8, ::1, RFC 1918 addresses and *.local are spoken to
// over plain HTTP (go-containerregistry's default); every other registry
// over HTTPS.
//
// Whitespace, control bytes and over-long input are refused before parsing,
// with an error that wraps ErrInvalidReference.
func ParseReference(s string) (name.Reference, error) {
	if s == "" {
		return nil, fmt.Errorf("%w: empty", ErrInvalidReference)
	}
	if len(s) > maxRefLen {
		return nil, fmt.Errorf("%w: %d bytes long, the limit is %d", ErrInvalidReference, len(s), maxRefLen)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f {
			return nil, fmt.Errorf("%w: %q contains a space, control or non-ASCII byte at offset %d", ErrInvalidReference, s, i)
		}
	}
	ref, err := name.ParseReference(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrInvalidReference, s, err)
	}
	return ref, nil
}

// IsCatalogName reports whether s names a catalog entry rather than an OCI
// reference. A catalog name is bare: no registry, no '/', no ":tag" and no
// "@digest" ("debian-bookworm"). Anything with one of those
// ("docker.io/library/debian:bookworm", "alpine:3.20", "ghcr.io/x/y") is an
// OCI reference. IsCatalogName does not validate the name; the catalog does.
func IsCatalogName(s string) bool {
	return s != "" && !strings.ContainsAny(s, "/:@")
}

// DefaultImageName derives an image name from a reference, for when the user
// gives none: the last path element of the repository, a '-', and the tag
// ("docker.io/library/debian:bookworm" -> "debian-bookworm",
// "ghcr.io/myorg/devimg:v2" -> "devimg-v2"), or for a digest reference the
// first 12 hex digits of the digest ("alpine@sha256:0123..." ->
// "alpine-0123456789ab"). The result is lowercased, any byte outside
// model.ValidateName's set becomes '-', and it is cut to model.MaxNameLen
// (the repository part is shortened first, so the tag survives). It always
// passes model.ValidateName.
func DefaultImageName(ref name.Reference) string {
	repo := ref.Context().RepositoryStr()
	if i := strings.LastIndexByte(repo, '/'); i >= 0 {
		repo = repo[i+1:]
	}
	var suffix string
	switch r := ref.(type) {
	case name.Digest:
		d := r.DigestStr()
		if _, hex, ok := strings.Cut(d, ":"); ok {
			d = hex
		}
		suffix = d[:min(12, len(d))]
	default:
		suffix = ref.Identifier()
	}
	repo, suffix = sanitizeName(repo), sanitizeName(suffix)
	if repo == "" {
		repo = "image"
	}
	if suffix == "" {
		return fallbackName(repo)
	}
	// Keep the tag whole when it fits; shorten the repository part first.
	if room := model.MaxNameLen - len(suffix) - 1; len(repo) > room {
		if room < 1 {
			return fallbackName(repo + "-" + suffix)
		}
		repo = repo[:room]
	}
	return fallbackName(repo + "-" + suffix)
}

// sanitizeName lowercases s and replaces every byte model.ValidateName does
// not allow with '-'.
func sanitizeName(s string) string {
	b := []byte(strings.ToLower(s))
	for i, c := range b {
		if !nameByte(c) {
			b[i] = '-'
		}
	}
	return string(b)
}

// fallbackName cuts s to model.MaxNameLen and makes it start with a letter or
// digit, so that it passes model.ValidateName.
func fallbackName(s string) string {
	s = strings.TrimLeft(s, "._-")
	if len(s) > model.MaxNameLen {
		s = s[:model.MaxNameLen]
	}
	if s == "" {
		return "image"
	}
	return s
}

// nameByte reports whether model.ValidateName allows c.
func nameByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
}
