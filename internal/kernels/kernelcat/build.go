package kernelcat

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"

	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
)

// IndexFile is the name of the index document in a catalog directory.
const IndexFile = "index.json"

// BuildOptions says which package to add to which catalog directory.
type BuildOptions struct {
	Deb        string // a linux-image-*.deb
	Name       string // catalog entry name, e.g. "generic-6.1"
	OutDir     string // catalog directory: index.json and <name>/ artifacts
	InitBinary string // static banger-init for the generated initramfs
	// ModulesCompression of the modules tarball: "gzip" (default) or "zstd".
	ModulesCompression string
	Progress           progress.Func
}

// BuildFromDeb imports the kernel package, writes its artifacts to
// <OutDir>/<Name>/{kernel,initrd,modules.tar.gz|.zst} and adds (or
// replaces) its entry in <OutDir>/index.json, with URLs relative to the
// index. Publish OutDir as it is, over http(s) or as a file:// URL.
func BuildFromDeb(ctx context.Context, o BuildOptions) (Entry, error) {
	if err := model.ValidateName("kernel", o.Name); err != nil {
		return Entry{}, err
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return Entry{}, err
	}
	ix := Index{Schema: SchemaVersion}
	indexPath := filepath.Join(o.OutDir, IndexFile)
	if data, err := os.ReadFile(indexPath); err == nil {
		if err := json.Unmarshal(data, &ix); err != nil {
			return Entry{}, fmt.Errorf("existing %s: %w: %w", indexPath, err, ErrBadIndex)
		}
		if ix.Schema != SchemaVersion {
			return Entry{}, fmt.Errorf("existing %s is schema %d, not %d: %w", indexPath, ix.Schema, SchemaVersion, ErrBadIndex)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return Entry{}, err
	}
	tmp, err := os.MkdirTemp(o.OutDir, ".build-*")
	if err != nil {
		return Entry{}, err
	}
	defer os.RemoveAll(tmp)
	k, err := kernels.ImportDeb(ctx, filepath.Join(tmp, "kernel"), o.Name, o.Deb, kernels.DebOptions{InitBinary: o.InitBinary, Progress: o.Progress})
	if err != nil {
		return Entry{}, err
	}
	art := filepath.Join(tmp, "artifacts")
	if err := os.Mkdir(art, 0o755); err != nil {
		return Entry{}, err
	}
	e := Entry{Name: o.Name, Version: k.Version, Arch: k.Arch, Format: k.Format}
	add := func(src, file string) (*File, error) {
		if err := os.Rename(src, filepath.Join(art, file)); err != nil {
			return nil, err
		}
		a, err := kernels.HashFile(filepath.Join(art, file))
		if err != nil {
			return nil, err
		}
		return &File{URL: o.Name + "/" + file, SHA256: a.SHA256, Size: a.Size}, nil
	}
	kf, err := add(k.Kernel.Path, "kernel")
	if err != nil {
		return Entry{}, err
	}
	e.Kernel = *kf
	if k.Initrd != nil {
		if e.Initrd, err = add(k.Initrd.Path, "initrd"); err != nil {
			return Entry{}, err
		}
	}
	if k.Modules != nil {
		file := "modules.tar.gz"
		if o.ModulesCompression == "zstd" {
			file = "modules.tar.zst"
		}
		tarPath := filepath.Join(tmp, file)
		if err := writeModulesTar(k.Modules.Path, tarPath, o.ModulesCompression); err != nil {
			return Entry{}, err
		}
		if e.Modules, err = add(tarPath, file); err != nil {
			return Entry{}, err
		}
	}
	dst := filepath.Join(o.OutDir, o.Name)
	old := filepath.Join(tmp, "old")
	if err := os.Rename(dst, old); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return Entry{}, err
	}
	if err := os.Rename(art, dst); err != nil {
		return Entry{}, err
	}
	replaced := false
	for i := range ix.Entries {
		if ix.Entries[i].Name == o.Name {
			ix.Entries[i], replaced = e, true
		}
	}
	if !replaced {
		ix.Entries = append(ix.Entries, e)
	}
	sort.Slice(ix.Entries, func(i, j int) bool { return ix.Entries[i].Name < ix.Entries[j].Name })
	data, err := json.MarshalIndent(ix, "", "  ")
	if err != nil {
		return Entry{}, err
	}
	if err := writeAtomic(indexPath, append(data, '\n')); err != nil {
		return Entry{}, err
	}
	return e, nil
}

// writeModulesTar writes a reproducible tar (sorted, uid/gid 0, mtime 0)
// of the tree at root, member names relative to root.
func writeModulesTar(root, out, compression string) (err error) {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	var zw io.WriteCloser
	if compression == "zstd" {
		zw, err = zstd.NewWriter(f)
		if err != nil {
			return err
		}
	} else {
		zw, err = gzip.NewWriterLevel(f, gzip.DefaultCompression)
		if err != nil {
			return err
		}
	}
	tw := tar.NewWriter(zw)
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		switch {
		case d.IsDir():
			return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: rel + "/", Mode: 0o755, Format: tar.FormatPAX})
		case d.Type().IsRegular():
			info, err := d.Info()
			if err != nil {
				return err
			}
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: 0o644, Size: info.Size(), Format: tar.FormatPAX}); err != nil {
				return err
			}
			src, err := os.Open(p) // #nosec G122 -- our own freshly imported tree
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, src)
			_ = src.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("tar %s: %w", root, err)
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

func writeAtomic(p string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), p)
}
