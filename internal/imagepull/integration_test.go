package imagepull

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/klauspost/compress/gzip"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/testutil"
)

// capNetRawValue is a VFS_CAP_REVISION_2 security.capability value granting
// cap_net_raw (bit 13) permitted+effective.
const capNetRawValue = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// startDockerRegistry runs Debian's docker-registry on a free 127.0.0.1
// port with storage in a temp dir, and returns host:port.
func startDockerRegistry(t testing.TB) string {
	t.Helper()
	testutil.RequiresTool(t, "docker-registry")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("docker-registry", "serve", cfgPath)
	logf, _ := os.Create(filepath.Join(dir, "registry.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("start docker-registry: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logf.Close()
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return addr
			}
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "registry.log"))
			t.Fatalf("docker-registry on %s did not come up: %v\n%s", addr, err, log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// gzipFile compresses src into dir and returns the path.
func gzipFile(t testing.TB, src, dir string) string {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out := filepath.Join(dir, filepath.Base(src)+".gz")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	zw, _ := gzip.NewWriterLevel(f, gzip.BestSpeed)
	if _, err := io.Copy(zw, in); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

// debianTopLayer deletes, replaces and adds files on top of the Debian
// test root filesystem.
func debianTopLayer(t testing.TB) []byte {
	suid := file("usr/local/bin/suidtest", "#!/bin/sh\necho suid\n")
	suid.mode = 0o4755
	sgid := file("usr/local/bin/sgidtest", "sgid")
	sgid.mode, sgid.gid = 0o2711, 42
	capf := file("usr/local/bin/captest", "needs cap_net_raw")
	capf.mode, capf.xattrs = 0o755, map[string]string{"security.capability": capNetRawValue}
	home := dir("home/user")
	home.uid, home.gid, home.mode = 1000, 1000, 0o750
	homeFile := file("home/user/.profile", "export X=1\n")
	homeFile.uid, homeFile.gid, homeFile.mode = 1000, 1000, 0o600
	hostname := file("etc/hostname", "banger-test\n")
	shadow := file("etc/shadow-extra", "root:*:19000:0:99999:7:::\n")
	shadow.mode, shadow.gid = 0o640, 42
	null2 := entry{name: "dev/banger-null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3}
	fifo := entry{name: "run/banger.fifo", typ: tar.TypeFifo, mode: 0o620, gid: 5}
	tmpd := dir("var/banger-tmp")
	tmpd.mode = 0o1777
	return makeTar(t,
		// deletions
		file("usr/share/doc/.wh.sudo", ""), file("etc/.wh.issue.net", ""),
		// opaque dir, with new content
		dir("etc/skel"), file("etc/skel/.wh..wh..opq", ""), file("etc/skel/.banger", "skel\n"),
		// replacements: content, and a directory replaced by a file
		hostname, file("etc/motd", "welcome to banger\n"), file("srv", "srv is a file now\n"),
		// additions
		dir("usr/local/bin"), suid, sgid, capf, hardlink("usr/local/bin/sudo-link", "usr/bin/sudo"),
		symlink("usr/local/bin/rel-link", "../../bin/bash"), symlink("usr/local/bin/abs-link", "/usr/bin/env"),
		dir("home"), home, homeFile, shadow, null2, dir("run"), fifo, tmpd,
		file("opt/odd/with space #!", "odd"), file("opt/odd/-dash <12>", "odd2"),
	)
}

// pushDebianImage pushes the two-layer Debian test image to the registry at
// host and returns its reference.
func pushDebianImage(t testing.TB, host string) string {
	t.Helper()
	rootTar := testutil.DebianRootfsTar(t, "", nil)
	gz := gzipFile(t, rootTar, t.TempDir())
	base, err := tarball.LayerFromFile(gz)
	if err != nil {
		t.Fatal(err)
	}
	top := debianTopLayer(t)
	topLayer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(top)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img := buildImage(t, "amd64")
	if img, err = mutate.AppendLayers(img, base, topLayer); err != nil {
		t.Fatal(err)
	}
	ref := host + "/banger/debian:test"
	tag, _ := name.ParseReference(ref)
	if err := remote.Write(tag, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return ref
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// referenceUnpack extracts ref as root with skopeo + umoci into dir and
// returns the rootfs path.
func referenceUnpack(t testing.TB, ref, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	layout := filepath.Join(dir, "layout")
	run(t, "skopeo", "copy", "--src-tls-verify=false", "docker://"+ref, "oci:"+layout+":test")
	bundle := filepath.Join(dir, "bundle")
	run(t, "umoci", "unpack", "--image", layout+":test", bundle)
	return filepath.Join(bundle, "rootfs")
}

// fileRecord is what the comparison looks at for one path.
type fileRecord struct {
	Type    fs.FileMode
	Mode    uint32 // permissions + setuid/setgid/sticky
	UID     uint32
	GID     uint32
	Size    int64
	SHA256  string
	Link    string
	Rdev    uint64
	Caps    string
	HasCaps bool
	Xattrs  string // every xattr, name=hex value, sorted
	Nlink   uint64
	Group   string // first path (in walk order) of this path's inode, for hardlinks
}

func walkTree(t testing.TB, root string) map[string]fileRecord {
	t.Helper()
	out := map[string]fileRecord{}
	firstOf := map[uint64]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		r := fileRecord{Type: d.Type(), Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			r.Nlink = st.Nlink
			if st.Nlink > 1 {
				if _, ok := firstOf[st.Ino]; !ok {
					firstOf[st.Ino] = rel
				}
				r.Group = firstOf[st.Ino]
			}
		}
		r.Xattrs = allXattrs(t, p)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			r.Size = st.Size
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			r.SHA256 = hex.EncodeToString(h.Sum(nil))
		case unix.S_IFLNK:
			r.Link, _ = os.Readlink(p)
		case unix.S_IFCHR, unix.S_IFBLK:
			r.Rdev = st.Rdev
		}
		buf := make([]byte, 256)
		if n, err := unix.Lgetxattr(p, "security.capability", buf); err == nil {
			r.Caps, r.HasCaps = hex.EncodeToString(buf[:n]), true
		} else if !errors.Is(err, unix.ENODATA) && !errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("getxattr %s: %w", p, err)
		}
		out[rel] = r
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", root, err)
	}
	return out
}

// allXattrs lists every xattr of p as "name=hex", sorted.
func allXattrs(t testing.TB, p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			return ""
		}
		t.Fatalf("listxattr %s: %v", p, err)
	}
	var out []string
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, name, err)
		}
		out = append(out, name+"="+hex.EncodeToString(v[:m]))
	}
	sort.Strings(out)
	return strings.Join(out, ";")
}

// banger runs the banger pipeline: Pull, Flatten, BuildExt4, ApplyOwnership.
func bangerPipeline(t testing.TB, ctx context.Context, ref string, cache *Cache, work string, builder Builder) (string, Metadata) {
	t.Helper()
	img, err := Pull(ctx, ref, PullOptions{Cache: cache})
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	scratch := filepath.Join(work, "scratch")
	if err := os.Mkdir(scratch, 0o700); err != nil {
		t.Fatal(err)
	}
	ext4 := filepath.Join(work, "rootfs.ext4")
	built, err := BuildImage(ctx, img, ext4, BuildOptions{Builder: builder, ScratchDir: scratch})
	if err != nil {
		t.Fatalf("BuildImage(%s): %v", builder, err)
	}
	if built.Builder != builder {
		t.Fatalf("BuildImage(%s) built with %s (fallback: %s)", builder, built.Builder, built.Fallback)
	}
	return ext4, built.Metadata
}

// TestIntegrationDebianImage pulls a real two-layer Debian image from a real
// registry server and compares the ext4 banger builds, file by file, with a
// root extraction by skopeo + umoci.
func TestIntegrationDebianImage(t *testing.T) {
	testutil.RequiresRoot(t)
	testutil.RequiresTool(t, "docker-registry", "skopeo", "umoci", "mkfs.ext4", "debugfs", "e2fsck", "mount", "umount")
	testutil.RequiresLoop(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	host := startDockerRegistry(t)
	ref := pushDebianImage(t, host)
	refRoot := referenceUnpack(t, ref, filepath.Join(t.TempDir(), "reference"))
	want := walkTree(t, refRoot)
	cache := &Cache{Dir: filepath.Join(t.TempDir(), "cache")}
	for _, builder := range []Builder{BuilderDirect, BuilderStaging} {
		t.Run(string(builder), func(t *testing.T) {
			compareWithReference(t, ctx, ref, cache, builder, want)
		})
	}
}

// compareWithReference builds ref with builder and compares the ext4, path
// by path, with the umoci extraction want.
func compareWithReference(t *testing.T, ctx context.Context, ref string, cache *Cache, builder Builder, want map[string]fileRecord) {
	work := t.TempDir()
	ext4, md := bangerPipeline(t, ctx, ref, cache, work, builder)
	if len(md) < 10000 {
		t.Errorf("Metadata has %d paths; the Debian image has about 11k", len(md))
	}

	out, err := exec.CommandContext(ctx, "e2fsck", "-fn", ext4).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", ext4, err, out)
	}

	// Verification only: the pipeline itself never mounts.
	mnt := filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", "-o", "loop,ro", ext4, mnt)
	t.Cleanup(func() { _ = exec.Command("umount", mnt).Run() })
	got := walkTree(t, mnt)
	delete(got, "lost+found")

	var diffs []string
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			diffs = append(diffs, fmt.Sprintf("%q: missing from the ext4 (reference %+v)", p, w))
			continue
		}
		if g != w {
			diffs = append(diffs, fmt.Sprintf("%q:\n  reference %+v\n  banger    %+v", p, w, g))
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%q: in the ext4, not in the reference", p))
		}
	}
	sort.Strings(diffs)
	t.Logf("compared %d paths (reference) with %d (ext4)", len(want), len(got))
	if len(diffs) > 0 {
		t.Errorf("%d differences between banger's ext4 and the umoci reference; first ones:\n%s", len(diffs), strings.Join(diffs[:min(len(diffs), 40)], "\n"))
	}

	// The layer-2 features are really there (not just equally absent).
	for p, check := range map[string]func(fileRecord) bool{
		"usr/local/bin/suidtest": func(r fileRecord) bool { return r.Mode == 0o4755 },
		"usr/local/bin/captest":  func(r fileRecord) bool { return r.Caps == hex.EncodeToString([]byte(capNetRawValue)) },
		"usr/bin/sudo":           func(r fileRecord) bool { return r.Mode == 0o4755 && r.UID == 0 },
		"etc/shadow":             func(r fileRecord) bool { return r.Mode == 0o640 && r.GID == 42 },
		"srv":                    func(r fileRecord) bool { return r.Type.IsRegular() },
		"dev/banger-null": func(r fileRecord) bool {
			return r.Type == fs.ModeDevice|fs.ModeCharDevice && r.Rdev == unix.Mkdev(1, 3)
		},
		"run/banger.fifo":    func(r fileRecord) bool { return r.Type == fs.ModeNamedPipe && r.GID == 5 },
		"home/user/.profile": func(r fileRecord) bool { return r.UID == 1000 && r.Mode == 0o600 },
	} {
		if !check(got[p]) {
			t.Errorf("%s in the ext4: %+v", p, got[p])
		}
	}
	for _, p := range []string{"usr/share/doc/sudo", "etc/issue.net", "etc/skel/.bashrc"} {
		if _, ok := got[p]; ok {
			t.Errorf("%s survived its whiteout", p)
		}
	}
}
