package mounts

import (
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
)

// TestBenchMount measures a host folder through the whole mount stack (FUSE
// → SFTP client → socket pair → mount server as uid 65534 → the folder)
// against the same operations straight on the folder, on this host with
// warm caches: a sequential read of a 256 MiB file, find + stat over a
// 10,000-file tree, and git status in a 10,000-file work tree. Run with
//
//	BANGER_BENCH=1 go test ./internal/mounts -run TestBenchMount -v -count=1
func TestBenchMount(t *testing.T) {
	testutil.OptIn(t, "BANGER_BENCH", "the mount benchmark")
	testutil.RequiresTool(t, "git")
	w := newWorld(t)
	big := filepath.Join(w.share, "big.bin")
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(f, rand.Reader, 256<<20); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	tree := filepath.Join(w.share, "tree")
	for i := 0; i < 10000; i++ {
		p := filepath.Join(tree, fmt.Sprintf("d%02d/e%02d/f%04d.txt", i%100, (i/100)%10, i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(fmt.Sprintf("file %d\n", i)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	git := func(dir string, args ...string) {
		cmd := exec.Command("git", append([]string{"-c", "safe.directory=*", "-C", dir}, args...)...)
		cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=b", "GIT_AUTHOR_EMAIL=b@b", "GIT_COMMITTER_NAME=b", "GIT_COMMITTER_EMAIL=b@b")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	git(tree, "init", "-q")
	git(tree, "add", ".")
	git(tree, "commit", "-qm", "tree")
	if err := exec.Command("chown", "-R", "65534:65534", w.share).Run(); err != nil {
		t.Fatal(err)
	}
	mnt := w.mountGuest(t, Spec{HostDir: w.share, GuestDir: "/src"})

	// timeIt runs fn twice: the first run is cold for the mount (nothing
	// in the page cache of the mount's files yet; the folder itself is warm
	// on this host), the second warm.
	timeIt := func(fn func()) [2]time.Duration {
		var d [2]time.Duration
		for i := range d {
			start := time.Now()
			fn()
			d[i] = time.Since(start)
		}
		return d
	}
	read := func(dir string) func() {
		return func() {
			f, err := os.Open(filepath.Join(dir, "big.bin"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			buf := make([]byte, 1<<20)
			if n, err := io.CopyBuffer(io.Discard, f, buf); err != nil || n != 256<<20 {
				t.Fatalf("read %d bytes, %v", n, err)
			}
		}
	}
	findStat := func(dir string) func() {
		return func() {
			out, err := exec.Command("find", filepath.Join(dir, "tree"), "-path", "*/.git", "-prune", "-o", "-type", "f", "-printf", "%s %T@\n").Output()
			if err != nil || len(out) == 0 {
				t.Fatalf("find: %v", err)
			}
		}
	}
	status := func(dir string) func() { return func() { git(filepath.Join(dir, "tree"), "status", "--porcelain") } }

	for _, m := range []struct {
		name string
		op   func(string) func()
	}{{"sequential read 256 MiB", read}, {"find + stat, 10,000 files", findStat}, {"git status, 10,000 files", status}} {
		d := timeIt(m.op(w.share))
		f := timeIt(m.op(mnt))
		for i, kind := range []string{"first run", "second run"} {
			extra := ""
			if m.name == "sequential read 256 MiB" {
				extra = fmt.Sprintf(" (%.0f MB/s vs %.0f MB/s)", 256*1.048576/f[i].Seconds(), 256*1.048576/d[1].Seconds())
			}
			t.Logf("%s, %s: folder (warm) %s, mount %s: mount/folder time %.1fx, speed %.2fx%s", m.name, kind,
				d[1].Round(time.Millisecond), f[i].Round(time.Millisecond), float64(f[i])/float64(d[1]), float64(d[1])/float64(f[i]), extra)
		}
	}
}
