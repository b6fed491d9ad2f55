package imagecat

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/atomicfile"
	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
)

// BuildOptions say what BuildFromTar builds and where it publishes it.
type BuildOptions struct {
	// RootfsTar is an uncompressed tar of a root filesystem, as
	// `mmdebstrap --format=tar` writes it (owners, modes, xattrs kept).
	RootfsTar string
	// Name is the catalog entry, e.g. "debian-bookworm".
	Name        string
	Description string
	// KernelRef is the kernel the image boots with (kernel catalog name).
	KernelRef string
	// AgentBinary is the static banger-vsock-agent to inject.
	AgentBinary string
	// Kernel and Initrd optionally put a kernel in the bundle (its
	// modules must be in the tree already); without one, pulls boot
	// KernelRef.
	Kernel, Initrd string
	// Size of rootfs.ext4; zero means imagepull.DefaultSize of the content.
	Size int64
	// OutDir is the catalog directory: index.json and <name>/ bundles.
	OutDir string
	// Builder is recorded in the metadata, e.g. "mmdebstrap bookworm".
	Builder string
	// Level is the zstd level (zero: zstd.SpeedBetterCompression).
	Level    zstd.EncoderLevel
	Progress progress.Func
}

// BuildFromTar turns a root filesystem tar into a catalog image the same
// way `banger image pull` turns an OCI image into one (imagepull.Flatten,
// BuildExt4, ApplyOwnership, InjectGuestAgents), packs it with WriteBundle
// as <OutDir>/<Name>/<sha256 prefix>.bundle, and adds or replaces the
// entry in <OutDir>/index.json (written atomically, bundle URL relative to
// the index), removing the bundle the entry named before. The OS id and
// version come from the tree's os-release. Publish OutDir as it is, over
// http(s) or as a file:// URL.
func BuildFromTar(ctx context.Context, o BuildOptions) (Entry, error) {
	if err := model.ValidateName("image", o.Name); err != nil {
		return Entry{}, err
	}
	if o.KernelRef != "" {
		if err := model.ValidateName("kernel", o.KernelRef); err != nil {
			return Entry{}, err
		}
	}
	if err := checkText(o.Description); err != nil {
		return Entry{}, fmt.Errorf("description: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(o.OutDir, o.Name), 0o755); err != nil { // #nosec G301 -- a catalog dir is published
		return Entry{}, err
	}
	ix, err := readIndexFile(filepath.Join(o.OutDir, IndexFile))
	if err != nil {
		return Entry{}, err
	}
	tmp, err := os.MkdirTemp("", "banger-catalog-build-")
	if err != nil {
		return Entry{}, err
	}
	defer os.RemoveAll(tmp)
	ext4, osInfo, err := BuildRootFS(ctx, o.RootfsTar, tmp, o.AgentBinary, o.Size, o.Progress)
	if err != nil {
		return Entry{}, err
	}

	md := Metadata{Schema: SchemaVersion, Name: o.Name, Description: o.Description, OS: osInfo,
		KernelRef: o.KernelRef, Created: time.Now().UTC().Truncate(time.Second), Builder: o.Builder}
	if o.Kernel != "" {
		format, version, err := kernels.DetectFormat(o.Kernel)
		if err != nil {
			return Entry{}, err
		}
		md.Kernel = &KernelInfo{Version: version, Format: format}
	}
	bundleTmp, err := os.CreateTemp(filepath.Join(o.OutDir, o.Name), ".bundle-*")
	if err != nil {
		return Entry{}, err
	}
	defer os.Remove(bundleTmp.Name())
	bw := bufio.NewWriterSize(bundleTmp, 1<<20)
	err = WriteBundle(ctx, bw, BundleInput{Metadata: md, RootFS: ext4, Kernel: o.Kernel, Initrd: o.Initrd}, WriteOptions{Level: o.Level, Progress: o.Progress})
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		err = bundleTmp.Sync()
	}
	if cerr := bundleTmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return Entry{}, err
	}
	size, sum, err := HashFile(ctx, bundleTmp.Name())
	if err != nil {
		return Entry{}, err
	}
	rel := o.Name + "/" + sum[:16] + ".bundle"
	if err := os.Chmod(bundleTmp.Name(), 0o644); err != nil { // #nosec G302 -- published for download
		return Entry{}, err
	}
	if err := os.Rename(bundleTmp.Name(), filepath.Join(o.OutDir, filepath.FromSlash(rel))); err != nil {
		return Entry{}, err
	}
	e := Entry{Name: o.Name, Description: o.Description, OS: osInfo, KernelRef: o.KernelRef,
		Bundle: File{URL: rel, SHA256: sum, Size: size}}
	old := ix.upsert(e)
	if err := WriteIndexFile(filepath.Join(o.OutDir, IndexFile), ix); err != nil {
		return Entry{}, err
	}
	if old != nil && old.Bundle.URL != rel && isLocalBundle(old.Bundle.URL, o.Name) {
		_ = os.Remove(filepath.Join(o.OutDir, filepath.FromSlash(old.Bundle.URL)))
	}
	return e, nil
}

// isLocalBundle reports whether url is a bundle path BuildFromTar wrote for
// name ("<name>/<hex>.bundle"), so it may delete it.
func isLocalBundle(url, name string) bool {
	base, ok := strings.CutPrefix(url, name+"/")
	return ok && !strings.ContainsAny(base, "/\\") && strings.HasSuffix(base, ".bundle") && base != ".bundle"
}

// BuildRootFS makes <workDir>/rootfs.ext4 from a root filesystem tar with
// the pull pipeline: flatten into <workDir>/rootfs (unprivileged), size
// (zero: imagepull.DefaultSize), BuildExt4, ApplyOwnership and
// InjectGuestAgents with the given agent. It returns the ext4 path and
// the OS of the tree's os-release.
func BuildRootFS(ctx context.Context, rootfsTar, workDir, agentBinary string, size int64, pf progress.Func) (string, OS, error) {
	if agentBinary == "" {
		return "", OS{}, errors.New("build rootfs: no agent binary given")
	}
	if _, err := imagepull.CheckE2fsprogs(ctx); err != nil {
		return "", OS{}, err
	}
	tree := filepath.Join(workDir, "rootfs")
	if err := os.Mkdir(tree, 0o700); err != nil {
		return "", OS{}, err
	}
	md, err := imagepull.Flatten(ctx, tarSource{path: rootfsTar}, tree, imagepull.FlattenOptions{Progress: pf})
	if err != nil {
		return "", OS{}, fmt.Errorf("build rootfs from %s: %w", rootfsTar, err)
	}
	osInfo, err := readOSRelease(tree)
	if err != nil {
		return "", OS{}, fmt.Errorf("build rootfs from %s: %w", rootfsTar, err)
	}
	if err := freshHostKeys(tree, md); err != nil {
		return "", OS{}, fmt.Errorf("build rootfs from %s: %w", rootfsTar, err)
	}
	content := imagepull.DiskUsage(md)
	if size == 0 {
		size = imagepull.DefaultSize(content)
	} else if err := imagepull.CheckSize(content, size); err != nil {
		return "", OS{}, err
	}
	ext4 := filepath.Join(workDir, MemberRootFS)
	pf.Report(progress.Event{Phase: "mkfs", Message: fmt.Sprintf("%d bytes of content into a %d byte ext4", content, size)})
	if err := imagepull.BuildExt4(ctx, tree, ext4, size); err != nil {
		return "", OS{}, err
	}
	if err := os.RemoveAll(tree); err != nil {
		return "", OS{}, err
	}
	pf.Report(progress.Event{Phase: "ownership", Total: int64(len(md)), Unit: "files"})
	if err := imagepull.ApplyOwnership(ctx, ext4, md); err != nil {
		return "", OS{}, err
	}
	pf.Report(progress.Event{Phase: "inject"})
	if err := imagepull.InjectGuestAgents(ctx, ext4, imagepull.GuestAssets{AgentBinary: agentBinary}); err != nil {
		return "", OS{}, err
	}
	return ext4, osInfo, nil
}

// hostKeysUnit makes each VM generate its own SSH host keys at its first
// boot, before sshd starts: one image is shared by many VMs, and keys baked
// into it would be the same on all of them.
const hostKeysUnit = `[Unit]
Description=banger: generate this machine's SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
RequiredBy=ssh.service
`

// HostKeysUnit is the unit freshHostKeys installs, under
// /etc/systemd/system, required by ssh.service.
const HostKeysUnit = "banger-ssh-hostkeys.service"

// freshHostKeys removes the SSH host keys package installation generated
// (etc/ssh/ssh_host_*) from the flattened tree and installs HostKeysUnit,
// when the tree has an etc/ssh directory. md is updated to match.
func freshHostKeys(tree string, md imagepull.Metadata) error {
	if m, ok := md["etc/ssh"]; !ok || m.Type != imagepull.TypeDir {
		return nil
	}
	for p, m := range md {
		if strings.HasPrefix(p, "etc/ssh/ssh_host_") && m.Type != imagepull.TypeDir {
			if err := os.Remove(filepath.Join(tree, filepath.FromSlash(p))); err != nil {
				return fmt.Errorf("remove baked-in host key: %w", err)
			}
			delete(md, p)
		}
	}
	for _, dir := range []string{"etc", "etc/systemd", "etc/systemd/system", "etc/systemd/system/ssh.service.wants"} {
		m, ok := md[dir]
		if ok && m.Type != imagepull.TypeDir {
			return fmt.Errorf("%s is not a directory", dir)
		}
		if !ok {
			if err := os.Mkdir(filepath.Join(tree, filepath.FromSlash(dir)), 0o755); err != nil { // #nosec G301 -- a guest directory
				return err
			}
			md[dir] = imagepull.FileMeta{Type: imagepull.TypeDir, Mode: 0o755}
		}
	}
	unit := "etc/systemd/system/" + HostKeysUnit
	link := "etc/systemd/system/ssh.service.wants/" + HostKeysUnit
	for _, p := range []string{unit, link} {
		if _, ok := md[p]; ok {
			return fmt.Errorf("%s exists already", p)
		}
	}
	if err := os.WriteFile(filepath.Join(tree, filepath.FromSlash(unit)), []byte(hostKeysUnit), 0o644); err != nil { // #nosec G306 -- a unit file
		return err
	}
	md[unit] = imagepull.FileMeta{Type: imagepull.TypeRegular, Mode: 0o644, Size: int64(len(hostKeysUnit))}
	if err := os.Symlink("/"+unit, filepath.Join(tree, filepath.FromSlash(link))); err != nil {
		return err
	}
	md[link] = imagepull.FileMeta{Type: imagepull.TypeSymlink, Mode: 0o777}
	return nil
}

// tarSource is a one-layer imagepull.LayerSource reading a plain tar file.
type tarSource struct{ path string }

func (t tarSource) Layers() []imagepull.Layer {
	return []imagepull.Layer{{Digest: "file:" + filepath.Base(t.path), MediaType: "application/x-tar"}}
}

func (t tarSource) OpenLayer(_ context.Context, _ int) (io.ReadCloser, error) {
	return os.Open(t.path)
}

// readOSRelease reads ID and VERSION_ID from the tree's os-release
// (usr/lib/os-release, else etc/os-release), refusing symlinks: the tree
// is untrusted and a link could point anywhere on the host.
func readOSRelease(tree string) (OS, error) {
	for _, rel := range []string{"etc/os-release", "usr/lib/os-release"} {
		p := filepath.Join(tree, rel)
		st, err := os.Lstat(p)
		if err != nil || !st.Mode().IsRegular() || st.Size() > 64<<10 {
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return OS{}, err
		}
		info := parseOSRelease(data)
		if !osIDRE.MatchString(info.ID) || (info.Version != "" && !osVerRE.MatchString(info.Version)) {
			return OS{}, fmt.Errorf("%s: unusable ID %q / VERSION_ID %q", rel, info.ID, info.Version)
		}
		return info, nil
	}
	return OS{}, errors.New("no regular etc/os-release or usr/lib/os-release in the root filesystem")
}

func parseOSRelease(data []byte) OS {
	var info OS
	for line := range strings.SplitSeq(string(data), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok {
			continue
		}
		v = strings.Trim(v, `"'`)
		switch k {
		case "ID":
			info.ID = v
		case "VERSION_ID":
			info.Version = v
		}
	}
	return info
}

// readIndexFile reads a catalog dir's index, or returns an empty one when
// there is none yet.
func readIndexFile(p string) (Index, error) {
	data, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return Index{Schema: SchemaVersion}, nil
	}
	if err != nil {
		return Index{}, err
	}
	ix, err := ParseIndex(data)
	if err != nil {
		return Index{}, fmt.Errorf("existing %s: %w", p, err)
	}
	return ix, nil
}

// upsert adds e, or replaces the entry of its name and returns the old one.
func (ix *Index) upsert(e Entry) *Entry {
	for i := range ix.Entries {
		if ix.Entries[i].Name == e.Name {
			old := ix.Entries[i]
			ix.Entries[i] = e
			return &old
		}
	}
	ix.Entries = append(ix.Entries, e)
	return nil
}

// WriteIndexFile validates ix and writes it to p atomically (temp file,
// fsync, rename; see atomicfile).
func WriteIndexFile(p string, ix Index) error {
	ix.Schema = SchemaVersion
	data, err := json.MarshalIndent(ix, "", "  ")
	if err != nil {
		return err
	}
	data = append(data, '\n')
	if _, err := ParseIndex(data); err != nil {
		return fmt.Errorf("write index %s: %w", p, err)
	}
	return atomicfile.WriteFile(p, data, 0o644) // published for download
}
