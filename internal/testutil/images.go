package testutil

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The images of the any-image tests (issue 11), each the shape of a
// popular image without systemd, built from real Debian content:
//
//   - DebianMinbaseTar: mmdebstrap --variant=minbase, no systemd, no sshd
//     (docker.io/library/debian);
//   - BusyboxRootfsTar: Debian's busybox-static alone with its applet links
//     (docker.io/library/busybox);
//   - ScratchRootfsTar: one static Go binary (distroless, scratch).
//
// The systemd image is DebianRootfsTar's standard set.

// DebianMinbaseTar returns a cached tarball of Debian bookworm built with
// mmdebstrap --variant=minbase and nothing more: no init, no sshd, apt as
// its package manager. Building takes ~30 s the first time.
func DebianMinbaseTar(t testing.TB) string {
	t.Helper()
	RequiresRoot(t)
	RequiresTool(t, "mmdebstrap")
	out := filepath.Join(CacheDir(), "debian-bookworm-minbase.tar")
	err := withCacheLock("debian-minbase", func() error {
		if _, err := os.Stat(out); err == nil {
			return nil
		}
		tmp := out + ".tmp"
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "mmdebstrap", "--variant=minbase", "--format=tar", "bookworm", tmp, HostDebianMirror())
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			_ = os.Remove(tmp)
			return fmt.Errorf("mmdebstrap: %w", err)
		}
		return os.Rename(tmp, out)
	})
	if err != nil {
		t.Fatalf("build Debian minbase test rootfs: %v", err)
	}
	return out
}

// busyboxBinary is where Debian's busybox-static package puts busybox.
const busyboxBinary = "/bin/busybox"

// BusyboxRootfsTar returns a cached tarball holding Debian's busybox-static
// binary (from the host's package) at /bin/busybox with a link for every
// applet it lists, /sbin/init among them, and the /etc/passwd and
// /etc/group of docker.io/library/busybox.
func BusyboxRootfsTar(t testing.TB) string {
	t.Helper()
	RequiresTool(t, "busybox")
	bin, err := os.ReadFile(busyboxBinary)
	if err != nil {
		Missing(t, TierTools, "busybox-static is not installed ("+err.Error()+")")
	}
	sum := sha256.Sum256(bin)
	out := filepath.Join(CacheDir(), "busybox-"+hex.EncodeToString(sum[:4])+".tar")
	err = withCacheLock("busybox", func() error {
		if _, err := os.Stat(out); err == nil {
			return nil
		}
		list, err := exec.Command(busyboxBinary, "--list-full").Output()
		if err != nil {
			return fmt.Errorf("busybox --list-full: %w", err)
		}
		return writeTar(out, func(tw *rootTar) {
			for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "tmp", "var", "home"} {
				tw.dir(d, 0o755)
			}
			tw.file("bin/busybox", 0o755, bin)
			for _, applet := range strings.Fields(string(list)) {
				if applet == "bin/busybox" || strings.Contains(applet, "..") {
					continue
				}
				rel, _ := filepath.Rel(filepath.Dir(applet), "bin/busybox")
				tw.link(applet, rel)
			}
			tw.file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\nnobody:x:65534:65534:nobody:/home:/bin/false\n"))
			tw.file("etc/group", 0o644, []byte("root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n"))
		})
	})
	if err != nil {
		t.Fatalf("build busybox test rootfs: %v", err)
	}
	return out
}

// ScratchProgram is the source of the scratch image's one binary, /app.
// It prints its uid, gid, working dir, GREETING and arguments on one line
// starting with "scratch-main", then sleeps for SLEEP seconds (default 0)
// and exits with status EXIT (default 0).
const ScratchProgram = `package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	wd, _ := os.Getwd()
	fmt.Printf("scratch-main uid=%d gid=%d cwd=%s GREETING=%s args=%s\n", os.Getuid(), os.Getgid(), wd, os.Getenv("GREETING"), strings.Join(os.Args[1:], ","))
	if s, err := strconv.Atoi(os.Getenv("SLEEP")); err == nil {
		time.Sleep(time.Duration(s) * time.Second)
	}
	code, _ := strconv.Atoi(os.Getenv("EXIT"))
	os.Exit(code)
}
`

// ScratchRootfsTar returns a cached tarball holding only /app, a static Go
// binary built from ScratchProgram: no shell, no libc, no /etc.
func ScratchRootfsTar(t testing.TB) string {
	t.Helper()
	RequiresTool(t, "go")
	sum := sha256.Sum256([]byte(ScratchProgram))
	out := filepath.Join(CacheDir(), "scratch-"+hex.EncodeToString(sum[:4])+".tar")
	err := withCacheLock("scratch", func() error {
		if _, err := os.Stat(out); err == nil {
			return nil
		}
		src, err := os.MkdirTemp("", "banger-scratch-src-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(src)
		if err := os.WriteFile(filepath.Join(src, "main.go"), []byte(ScratchProgram), 0o644); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(src, "go.mod"), []byte("module scratchapp\n\ngo 1.22\n"), 0o644); err != nil {
			return err
		}
		build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", "app", ".")
		build.Dir = src
		build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=-mod=mod", "GOWORK=off")
		if b, err := build.CombinedOutput(); err != nil {
			return fmt.Errorf("go build scratch app: %w\n%s", err, b)
		}
		bin, err := os.ReadFile(filepath.Join(src, "app"))
		if err != nil {
			return err
		}
		return writeTar(out, func(tw *rootTar) { tw.file("app", 0o755, bin) })
	})
	if err != nil {
		t.Fatalf("build scratch test rootfs: %v", err)
	}
	return out
}

// rootTar writes root-owned entries.
type rootTar struct {
	tw  *tar.Writer
	err error
}

func (r *rootTar) add(h *tar.Header, body []byte) {
	if r.err != nil {
		return
	}
	h.Name = "./" + h.Name
	h.ModTime = time.Unix(1700000000, 0)
	h.Format = tar.FormatPAX
	if h.Typeflag == tar.TypeReg {
		h.Size = int64(len(body))
	}
	if r.err = r.tw.WriteHeader(h); r.err == nil && len(body) > 0 {
		_, r.err = r.tw.Write(body)
	}
}

func (r *rootTar) dir(name string, mode int64) {
	r.add(&tar.Header{Name: name + "/", Typeflag: tar.TypeDir, Mode: mode}, nil)
}
func (r *rootTar) file(name string, mode int64, body []byte) {
	r.add(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: mode}, body)
}
func (r *rootTar) link(name, target string) {
	r.add(&tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target}, nil)
}

// writeTar writes out atomically with the entries fill adds.
func writeTar(out string, fill func(*rootTar)) error {
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	rt := &rootTar{tw: tar.NewWriter(f)}
	fill(rt)
	err = rt.err
	if err == nil {
		err = rt.tw.Close()
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}
