package testutil

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// CacheDir is the fixed directory where slow test fixtures (Debian root
// filesystems, kernel packages) are kept between runs. BANGER_TEST_CACHE
// overrides it. CI keeps it between runs.
func CacheDir() string {
	if d := os.Getenv("BANGER_TEST_CACHE"); d != "" {
		return d
	}
	return "/var/cache/banger-test"
}

// withCacheLock runs fn holding an exclusive flock on <cache>/<name>.lock, so
// that parallel test binaries build a fixture once.
func withCacheLock(name string, fn func() error) error {
	if err := os.MkdirAll(CacheDir(), 0o755); err != nil {
		return fmt.Errorf("create test cache %s: %w", CacheDir(), err)
	}
	if err := unix.Access(CacheDir(), unix.W_OK); err != nil {
		return fmt.Errorf("test cache %s is not writable (%w): %w", CacheDir(), err, errCacheReadOnly)
	}
	lock, err := os.OpenFile(filepath.Join(CacheDir(), name+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock test cache: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck
	return fn()
}

var errCacheReadOnly = errors.New("test cache not writable")

// HostDebianMirror returns the first Debian archive URI the host's apt
// sources name, so that fixtures are built from the same archive apt uses.
func HostDebianMirror() string {
	for _, f := range []string{"/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"} {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if strings.HasPrefix(line, "URIs:") {
				fields := strings.Fields(strings.TrimPrefix(line, "URIs:"))
				if len(fields) > 0 && !strings.Contains(fields[0], "security") {
					_ = fh.Close()
					return fields[0]
				}
			}
			if strings.HasPrefix(line, "deb ") {
				for _, f := range strings.Fields(line)[1:] {
					if strings.HasPrefix(f, "http") {
						_ = fh.Close()
						return f
					}
				}
			}
		}
		_ = fh.Close()
	}
	return "http://deb.debian.org/debian"
}

// DebianPackages is the package set of the standard Debian test root
// filesystem: systemd as PID 1, sshd, sudo (setuid), iproute2, udev, kmod.
var DebianPackages = []string{"systemd", "systemd-sysv", "openssh-server", "sudo", "iproute2", "udev", "kmod", "iputils-ping"}

// DebianRootfsTar returns the path of a cached tarball of a minimal Debian
// bookworm root filesystem built by mmdebstrap with the given extra packages
// on top of DebianPackages (nil for the standard set). The tar keeps owners,
// modes and xattrs. Building takes ~40 s the first time.
func DebianRootfsTar(t testing.TB, variant string, packages []string) string {
	t.Helper()
	RequiresRoot(t)
	RequiresTool(t, "mmdebstrap")
	if variant == "" {
		variant = "std"
	}
	if packages == nil {
		packages = DebianPackages
	}
	// The file name carries a hash of the package set, so changing the set
	// builds a new tarball instead of reusing a stale one.
	sorted := append([]string(nil), packages...)
	sort.Strings(sorted)
	sum := sha256.Sum256([]byte(strings.Join(sorted, ",")))
	out := filepath.Join(CacheDir(), "debian-bookworm-"+variant+"-"+hex.EncodeToString(sum[:4])+".tar")
	err := withCacheLock("debian-"+variant, func() error {
		if _, err := os.Stat(out); err == nil {
			return nil
		}
		tmp := out + ".tmp"
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "mmdebstrap", "--variant=minbase",
			"--include="+strings.Join(sorted, ","), "--format=tar", "bookworm", tmp, HostDebianMirror())
		cmd.Stdout = os.Stderr
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			_ = os.Remove(tmp)
			return fmt.Errorf("mmdebstrap: %w", err)
		}
		return os.Rename(tmp, out)
	})
	if err != nil {
		t.Fatalf("build Debian test rootfs: %v", err)
	}
	return out
}

// DebianKernelDeb returns the path of a cached Debian cloud kernel package
// (linux-image-*-cloud-amd64) fetched with apt-get download.
func DebianKernelDeb(t testing.TB) string {
	t.Helper()
	RequiresTool(t, "apt-get", "apt-cache")
	dir := filepath.Join(CacheDir(), "kernel")
	var found string
	err := withCacheLock("kernel", func() error {
		if m, _ := filepath.Glob(filepath.Join(dir, "linux-image-*-cloud-amd64*.deb")); len(m) > 0 {
			sort.Strings(m)
			found = m[len(m)-1]
			return nil
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		// The metapackage depends on the current versioned image package.
		dep, err := exec.Command("apt-cache", "depends", "linux-image-cloud-amd64").Output()
		if err != nil {
			return fmt.Errorf("apt-cache depends linux-image-cloud-amd64: %w", err)
		}
		pkg := ""
		for _, line := range strings.Split(string(dep), "\n") {
			line = strings.TrimSpace(line)
			if strings.HasPrefix(line, "Depends: linux-image-") {
				pkg = strings.TrimPrefix(line, "Depends: ")
				break
			}
		}
		if pkg == "" {
			return fmt.Errorf("no linux-image dependency in %q", dep)
		}
		cmd := exec.Command("apt-get", "download", pkg)
		cmd.Dir = dir
		cmd.Stdout = os.Stderr
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("apt-get download %s: %w", pkg, err)
		}
		m, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
		if len(m) == 0 {
			return fmt.Errorf("apt-get download %s left no .deb in %s", pkg, dir)
		}
		found = m[0]
		return nil
	})
	if errors.Is(err, errCacheReadOnly) {
		Missing(t, TierRoot, err.Error()+"; run as root or set BANGER_TEST_CACHE")
	}
	if err != nil {
		t.Fatalf("fetch Debian cloud kernel: %v", err)
	}
	return found
}

// Run runs a program and returns its combined output.
func Run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// CachedDir returns the cache entry <cache>/<name>, building it first when
// it is missing or older than any of the input files: build fills a fresh
// temporary directory, which then replaces the entry. All of it happens
// under the entry's lock, so test binaries running in parallel build it
// once and never see it half written.
func CachedDir(t testing.TB, name string, inputs []string, build func(dir string) error) string {
	t.Helper()
	dir := filepath.Join(CacheDir(), name)
	stamp := filepath.Join(dir, ".complete")
	err := withCacheLock(name, func() error {
		if fresh(stamp, inputs) {
			return nil
		}
		tmp := dir + ".tmp"
		if err := os.RemoveAll(tmp); err != nil {
			return err
		}
		if err := os.MkdirAll(tmp, 0o755); err != nil {
			return err
		}
		if err := build(tmp); err != nil {
			_ = os.RemoveAll(tmp)
			return err
		}
		if err := os.WriteFile(filepath.Join(tmp, ".complete"), nil, 0o644); err != nil {
			return err
		}
		if err := os.RemoveAll(dir); err != nil {
			return err
		}
		return os.Rename(tmp, dir)
	})
	if errors.Is(err, errCacheReadOnly) {
		Missing(t, TierRoot, err.Error()+"; run as root or set BANGER_TEST_CACHE")
	}
	if err != nil {
		t.Fatalf("build test cache entry %s: %v", name, err)
	}
	return dir
}

// fresh reports whether stamp exists and is no older than any input.
func fresh(stamp string, inputs []string) bool {
	sfi, err := os.Stat(stamp)
	if err != nil {
		return false
	}
	for _, in := range inputs {
		fi, err := os.Stat(in)
		if err != nil || fi.ModTime().After(sfi.ModTime()) {
			return false
		}
	}
	return true
}
