// Package imagecat is banger's image catalog, the fast path of
// `banger image pull NAME`: a JSON index of ready-made images (name,
// description, OS, the kernel they boot with, and a bundle URL, sha256 and
// size) published over http(s):// or file://, and the bundle format those
// images ship in: one zstd stream holding a metadata document and a sparse
// rootfs.ext4 that already contains banger's guest agents and an SSH
// server. See docs/image-catalog.md for both formats.
//
// A pull downloads the bundle into a cache directory (as
// <sha256>.partial while downloading, resumed with HTTP Range after an
// interruption), verifies its size and sha256 before anything reads it,
// and only then unpacks it, writing the data extents and leaving the holes
// unwritten so the rootfs stays sparse.
//
// The index is not signed; its sha256 sums are the trust anchor, so an index
// must come from a location the operator trusts. Everything in an index and
// a bundle is untrusted input all the same: names are checked with
// model.ValidateName, URLs may only use the index's own scheme family, no
// path component of a URL is used on disk, and a bundle may only create the
// fixed member names this package knows, with bounded sizes.
package imagecat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"

	"github.com/bangerdev/banger/internal/download"
	"github.com/bangerdev/banger/internal/model"
)

// SchemaVersion is the index schema this package reads and writes.
const SchemaVersion = 1

// IndexFile is the name of the index document in a catalog directory.
const IndexFile = "index.json"

// Limits on untrusted input.
const (
	maxIndexBytes  = 4 << 20  // the index document
	maxBundleBytes = 64 << 30 // one compressed bundle
	maxTextLen     = 512      // description and similar free text
)

// Index is an image catalog index.
type Index struct {
	Schema  int     `json:"schema"`
	Entries []Entry `json:"entries"`
}

// Entry is one image of the catalog.
type Entry struct {
	// Name is what users pull, e.g. "debian-bookworm".
	Name string `json:"name"`
	// Description is one line for `banger image catalog`.
	Description string `json:"description,omitempty"`
	// OS is the distribution inside the image.
	OS OS `json:"os"`
	// KernelRef names the kernel the image boots with: a local kernel or
	// a kernel catalog entry. Used when the bundle carries no kernel.
	KernelRef string `json:"kernel_ref,omitempty"`
	// Bundle is the downloadable bundle.
	Bundle File `json:"bundle"`
}

// OS identifies the distribution of an image, as ID and VERSION_ID of its
// /etc/os-release.
type OS struct {
	ID      string `json:"id"`
	Version string `json:"version,omitempty"`
}

// File is one downloadable artifact. URL is absolute or relative to the
// index; Fetch returns it absolute.
type File struct {
	URL    string `json:"url"`
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
}

// Errors of this package.
var (
	// ErrBadIndex marks an index that cannot be used.
	ErrBadIndex = errors.New("invalid image catalog index")
	// ErrBadScheme marks a URL whose scheme is not http, https or file,
	// or not the family of the index it came from.
	ErrBadScheme = download.ErrBadScheme
	// ErrChecksum marks a download whose size or sha256 is not the index's.
	ErrChecksum = download.ErrChecksum
	// ErrBadBundle marks a bundle that is truncated, corrupt or not in
	// this package's format.
	ErrBadBundle = errors.New("invalid image bundle")
)

// Lookup returns the entry of the given name.
func (ix Index) Lookup(name string) (Entry, bool) {
	for _, e := range ix.Entries {
		if e.Name == name {
			return e, true
		}
	}
	return Entry{}, false
}

// Names lists the entries' names, in index order.
func (ix Index) Names() []string {
	out := make([]string, 0, len(ix.Entries))
	for _, e := range ix.Entries {
		out = append(out, e.Name)
	}
	return out
}

// Fetch reads and validates the index at indexURL (http://, https:// or
// file://). Bundle URLs in the returned index are absolute.
func Fetch(ctx context.Context, indexURL string) (Index, error) {
	data, base, err := download.Index(ctx, indexURL, maxIndexBytes)
	if errors.Is(err, download.ErrTooLarge) {
		return Index{}, fmt.Errorf("image %w: %w", err, ErrBadIndex)
	}
	if err != nil {
		return Index{}, fmt.Errorf("image %w", err)
	}
	ix, err := ParseIndex(data)
	if err != nil {
		return Index{}, fmt.Errorf("image catalog %s: %w", base.Redacted(), err)
	}
	for i := range ix.Entries {
		if err := ix.Entries[i].resolve(base); err != nil {
			return Index{}, fmt.Errorf("image catalog %s: %w", base.Redacted(), err)
		}
	}
	return ix, nil
}

// ParseIndex decodes and validates an index document. URLs stay as written.
func ParseIndex(data []byte) (Index, error) {
	var ix Index
	if err := json.Unmarshal(data, &ix); err != nil {
		return Index{}, fmt.Errorf("%w: %w", ErrBadIndex, err)
	}
	if ix.Schema != SchemaVersion {
		return Index{}, fmt.Errorf("schema %d, this banger reads %d: %w", ix.Schema, SchemaVersion, ErrBadIndex)
	}
	seen := map[string]bool{}
	for i := range ix.Entries {
		e := &ix.Entries[i]
		if err := e.Validate(); err != nil {
			return Index{}, fmt.Errorf("entry %d: %w", i, err)
		}
		if seen[e.Name] {
			return Index{}, fmt.Errorf("entry %q twice: %w", e.Name, ErrBadIndex)
		}
		seen[e.Name] = true
	}
	return ix, nil
}

var (
	sha256RE = regexp.MustCompile(`^[0-9a-f]{64}$`)
	osIDRE   = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
	osVerRE  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}$`)
)

// Validate checks an entry's fields (not its URL's reachability).
func (e *Entry) Validate() error {
	if err := model.ValidateName("image", e.Name); err != nil {
		return fmt.Errorf("%w: %w", ErrBadIndex, err)
	}
	if err := checkText(e.Description); err != nil {
		return fmt.Errorf("%s: description: %w: %w", e.Name, err, ErrBadIndex)
	}
	if !osIDRE.MatchString(e.OS.ID) {
		return fmt.Errorf("%s: os id %q: %w", e.Name, e.OS.ID, ErrBadIndex)
	}
	if e.OS.Version != "" && !osVerRE.MatchString(e.OS.Version) {
		return fmt.Errorf("%s: os version %q: %w", e.Name, e.OS.Version, ErrBadIndex)
	}
	if e.KernelRef != "" {
		if err := model.ValidateName("kernel", e.KernelRef); err != nil {
			return fmt.Errorf("%s: kernel_ref: %w: %w", e.Name, err, ErrBadIndex)
		}
	}
	if !sha256RE.MatchString(e.Bundle.SHA256) {
		return fmt.Errorf("%s: bundle sha256 %q is not 64 lowercase hex digits: %w", e.Name, e.Bundle.SHA256, ErrBadIndex)
	}
	if e.Bundle.Size <= 0 || e.Bundle.Size > maxBundleBytes {
		return fmt.Errorf("%s: bundle size %d out of range: %w", e.Name, e.Bundle.Size, ErrBadIndex)
	}
	if e.Bundle.URL == "" {
		return fmt.Errorf("%s: empty bundle url: %w", e.Name, ErrBadIndex)
	}
	return nil
}

// checkText refuses free text that is too long or holds control bytes
// (it ends up on users' terminals).
func checkText(s string) error {
	if len(s) > maxTextLen {
		return fmt.Errorf("longer than %d bytes", maxTextLen)
	}
	if strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) }) {
		return errors.New("control characters")
	}
	return nil
}

// resolve makes e's bundle URL absolute against base and checks its scheme.
func (e *Entry) resolve(base *url.URL) error {
	abs, err := download.Resolve(base, e.Bundle.URL)
	if err != nil {
		return fmt.Errorf("%s: bundle %w: %w", e.Name, err, ErrBadIndex)
	}
	e.Bundle.URL = abs
	return nil
}
