// Package kernelcat is banger's kernel catalog: a JSON index of kernels
// (name, version, arch and, for each artifact, a URL, sha256 and size)
// published over http(s):// or file://, from which `banger kernel pull`
// downloads a kernel, resuming interrupted downloads with HTTP Range
// requests, and publishes it only after every artifact's sha256 matched.
//
// The index is not signed; the sha256 sums in it are the trust anchor, so
// an index must come from a location the operator trusts. Everything in an
// index is untrusted input all the same: names are checked with
// model.ValidateName, URLs may only use the index's own scheme family, and
// no path component of a URL is used on disk (downloads are cached under
// their sha256).
//
// Index format (schema 1):
//
//	{"schema": 1, "entries": [{
//	  "name": "generic-6.1", "version": "6.1.0-56-cloud-amd64",
//	  "arch": "x86_64", "format": "bzImage",
//	  "kernel":  {"url": "generic-6.1/kernel", "sha256": "...", "size": 1},
//	  "initrd":  {"url": "generic-6.1/initrd", "sha256": "...", "size": 1},
//	  "modules": {"url": "generic-6.1/modules.tar.gz", "sha256": "...", "size": 1}
//	}]}
//
// URLs are absolute or relative to the index. The modules artifact is a
// tar (gzip or zstd) of the lib/modules/<version> tree, member names
// relative to that directory.
package kernelcat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"regexp"

	dl "github.com/bangerdev/banger/internal/download"
	"github.com/bangerdev/banger/internal/model"
)

// SchemaVersion is the index schema this package reads and writes.
const SchemaVersion = 1

// maxIndexBytes bounds the index document.
const maxIndexBytes = 4 << 20

// maxArtifactBytes bounds one artifact.
const maxArtifactBytes = 4 << 30

// Index is a kernel catalog index.
type Index struct {
	Schema  int     `json:"schema"`
	Entries []Entry `json:"entries"`
}

// Entry is one kernel of the catalog.
type Entry struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	Arch    string `json:"arch"`
	Format  string `json:"format,omitempty"`
	Kernel  File   `json:"kernel"`
	Initrd  *File  `json:"initrd,omitempty"`
	Modules *File  `json:"modules,omitempty"`
}

// File is one downloadable artifact.
type File struct {
	URL    string `json:"url"`
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
}

// Errors of this package.
var (
	ErrChecksum  = dl.ErrChecksum
	ErrBadIndex  = errors.New("invalid kernel catalog index")
	ErrBadScheme = dl.ErrBadScheme
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

// Names lists the entries' names.
func (ix Index) Names() []string {
	out := make([]string, 0, len(ix.Entries))
	for _, e := range ix.Entries {
		out = append(out, e.Name)
	}
	return out
}

// Fetch reads and validates the index at indexURL (http://, https:// or
// file://). Artifact URLs in the returned index are absolute.
func Fetch(ctx context.Context, indexURL string) (Index, error) {
	data, base, err := dl.Index(ctx, indexURL, maxIndexBytes)
	if errors.Is(err, dl.ErrTooLarge) {
		return Index{}, fmt.Errorf("kernel %w: %w", err, ErrBadIndex)
	}
	if err != nil {
		return Index{}, fmt.Errorf("kernel %w", err)
	}
	var ix Index
	if err := json.Unmarshal(data, &ix); err != nil {
		return Index{}, fmt.Errorf("kernel catalog %s: %w: %w", indexURL, err, ErrBadIndex)
	}
	if ix.Schema != SchemaVersion {
		return Index{}, fmt.Errorf("kernel catalog %s: schema %d, this banger reads %d: %w", indexURL, ix.Schema, SchemaVersion, ErrBadIndex)
	}
	seen := map[string]bool{}
	for i := range ix.Entries {
		e := &ix.Entries[i]
		if err := e.resolve(base); err != nil {
			return Index{}, fmt.Errorf("kernel catalog %s: entry %d: %w", indexURL, i, err)
		}
		if seen[e.Name] {
			return Index{}, fmt.Errorf("kernel catalog %s: entry %q twice: %w", indexURL, e.Name, ErrBadIndex)
		}
		seen[e.Name] = true
	}
	return ix, nil
}

var (
	sha256RE  = regexp.MustCompile(`^[0-9a-f]{64}$`)
	versionRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$`)
)

// resolve validates e and makes its URLs absolute against base.
func (e *Entry) resolve(base *url.URL) error {
	if err := e.Validate(); err != nil {
		return err
	}
	for _, f := range e.files() {
		abs, err := dl.Resolve(base, f.URL)
		if err != nil {
			return fmt.Errorf("%s: %w: %w", e.Name, err, ErrBadIndex)
		}
		f.URL = abs
	}
	return nil
}

// Validate checks an entry's fields (not its URLs' reachability).
func (e *Entry) Validate() error {
	if err := model.ValidateName("kernel", e.Name); err != nil {
		return fmt.Errorf("%w: %w", err, ErrBadIndex)
	}
	if !versionRE.MatchString(e.Version) {
		return fmt.Errorf("%s: version %q: %w", e.Name, e.Version, ErrBadIndex)
	}
	if e.Arch != "x86_64" {
		return fmt.Errorf("%s: arch %q, banger runs x86_64 only: %w", e.Name, e.Arch, ErrBadIndex)
	}
	for _, f := range e.files() {
		if !sha256RE.MatchString(f.SHA256) {
			return fmt.Errorf("%s: sha256 %q is not 64 lowercase hex digits: %w", e.Name, f.SHA256, ErrBadIndex)
		}
		if f.Size <= 0 || f.Size > maxArtifactBytes {
			return fmt.Errorf("%s: size %d out of range: %w", e.Name, f.Size, ErrBadIndex)
		}
		if f.URL == "" {
			return fmt.Errorf("%s: empty url: %w", e.Name, ErrBadIndex)
		}
	}
	return nil
}

func (e *Entry) files() []*File {
	fs := []*File{&e.Kernel}
	if e.Initrd != nil {
		fs = append(fs, e.Initrd)
	}
	if e.Modules != nil {
		fs = append(fs, e.Modules)
	}
	return fs
}
