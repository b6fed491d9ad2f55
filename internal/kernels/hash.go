package kernels

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/bangerdev/banger/internal/model"
)

// HashFile returns the artifact record of the regular file at path: its
// path, sha256 and size.
func HashFile(path string) (model.Artifact, error) {
	f, err := os.Open(path)
	if err != nil {
		return model.Artifact{}, fmt.Errorf("hash %s: %w", path, err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return model.Artifact{}, fmt.Errorf("hash %s: %w", path, err)
	}
	return model.Artifact{Path: path, SHA256: hex.EncodeToString(h.Sum(nil)), Size: n}, nil
}

// TreeManifest returns the manifest of the directory tree at root: one line
// per entry below root, in byte order of the slash-separated relative path:
//
//	d - <relpath>
//	f <sha256> <relpath>
//	l <target> <relpath>
//
// and the total size of its regular files. HashTree hashes this text.
func TreeManifest(root string) (manifest []byte, size int64, err error) {
	type entry struct{ rel, line string }
	var entries []entry
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == root {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		switch {
		case d.IsDir():
			entries = append(entries, entry{rel, "d - " + rel})
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			entries = append(entries, entry{rel, "l " + target + " " + rel})
		case d.Type().IsRegular():
			a, err := HashFile(p)
			if err != nil {
				return err
			}
			size += a.Size
			entries = append(entries, entry{rel, "f " + a.SHA256 + " " + rel})
		default:
			return fmt.Errorf("%s: unsupported file type %v", p, d.Type())
		}
		return nil
	})
	if err != nil {
		return nil, 0, fmt.Errorf("manifest of %s: %w", root, err)
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].rel < entries[j].rel })
	var b strings.Builder
	for _, e := range entries {
		b.WriteString(e.line)
		b.WriteByte('\n')
	}
	return []byte(b.String()), size, nil
}

// HashTree returns the artifact record of the directory tree at root: its
// path, the sha256 of its TreeManifest and the total size of its files.
func HashTree(root string) (model.Artifact, error) {
	m, size, err := TreeManifest(root)
	if err != nil {
		return model.Artifact{}, err
	}
	sum := sha256.Sum256(m)
	return model.Artifact{Path: root, SHA256: hex.EncodeToString(sum[:]), Size: size}, nil
}
