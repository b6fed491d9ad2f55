package mounts

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// TestBenchMountsInGuest measures a --mount folder from inside a real
// guest (QEMU under TCG, the agent channel over virtio-serial, the daemon
// relaying to the mount server) against the same data on the VM's own
// disk, in the same run: a sequential read of a 256 MiB file, find + stat
// over a 10,000-file tree, and git status in a 10,000-file work tree. Each
// is timed inside the guest, cold (after the guest drops its caches) and
// warm (run again). Run with
//
//	BANGER_BENCH=1 go test ./test/e2e/mounts -run TestBenchMountsInGuest -v -count=1 -timeout 40m
//
// (about 25 minutes on a loaded 2-core host: the cold runs through the
// mount are slow). -run TestBenchMountsInGuest/seqread runs only the
// sequential read (and the set-up).
func TestBenchMountsInGuest(t *testing.T) {
	testutil.OptIn(t, "BANGER_BENCH", "the in-guest mount benchmark")
	ctx, cancel := context.WithTimeout(context.Background(), 38*time.Minute)
	defer cancel()
	layout := e2etest.DebianLayout(t, "git", []string{"git"})
	e := e2etest.SetupWith(t, nil, "gitimg", func(ns *e2etest.NetNS, reg *e2etest.Registry) string {
		return reg.Push(t, ns, layout, "banger/git")
	})
	d := e.D
	share := filepath.Join(t.TempDir(), "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	big, err := os.Create(filepath.Join(share, "big.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(big, rand.Reader, 256<<20); err != nil {
		t.Fatal(err)
	}
	_ = big.Close()
	tree := filepath.Join(share, "tree")
	for i := 0; i < 10000; i++ {
		p := filepath.Join(tree, fmt.Sprintf("d%02d/e%02d/f%04d.txt", i%100, (i/100)%10, i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(fmt.Sprintf("file %d\n", i)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	git := func(args ...string) {
		cmd := exec.CommandContext(ctx, "git", append([]string{"-C", tree}, args...)...)
		cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=b", "GIT_AUTHOR_EMAIL=b@b", "GIT_COMMITTER_NAME=b", "GIT_COMMITTER_EMAIL=b@b")
		if out, err := e2etest.CombinedOutput(cmd); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	git("init", "-q")
	git("add", ".")
	git("commit", "-qm", "tree")
	// The guest's own copy comes from one tarball (a sequential read), not
	// 10,000 small files through the mount.
	if out, err := e2etest.CombinedOutput(exec.CommandContext(ctx, "tar", "-C", share, "-cf", filepath.Join(share, "tree.tar"), "tree")); err != nil {
		t.Fatalf("tar the tree: %v\n%s", err, out)
	}

	d.MustCLI(ctx, "vm", "run", "--image", "gitimg", "--name", "bench", "--init", "banger", "--disk", "3G", "--cpus", "2", "--memory", "2G",
		"--mount", share+":/mnt/src")
	sh := func(t *testing.T, script string) string {
		t.Helper()
		r := d.CLI(ctx, "exec", "bench", "--", "sh", "-c", script)
		if r.Code != 0 {
			t.Fatalf("guest %q: exit %d: %s %s", script, r.Code, r.Stdout, r.Stderr)
		}
		return r.Stdout
	}
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(time.Second) {
		if r := d.CLI(ctx, "exec", "bench", "--", "test", "-f", "/mnt/src/big.bin"); r.Code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the folder is not mounted in the guest 90 s after vm run")
		}
	}
	// The same data on the VM's own disk.
	sh(t, "cp /mnt/src/big.bin /root/big.bin && tar -C /root -xf /mnt/src/tree.tar && git config --global --add safe.directory '*' && git -C /root/tree status --porcelain >/dev/null && sync")

	// timed runs script in the guest and returns how long it took there.
	timed := func(t *testing.T, script string) time.Duration {
		t.Helper()
		out := sh(t, `s=$(date +%s%N); `+script+` >/dev/null; e=$(date +%s%N); echo $((e-s))`)
		ns, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
		if err != nil {
			t.Fatalf("guest timing of %q: %q", script, out)
		}
		return time.Duration(ns)
	}
	dropCaches := "sync; echo 3 > /proc/sys/vm/drop_caches"
	// One subtest each, so that -run can pick one (the cold runs of find
	// and git status through the mount take most of the time).
	for _, m := range []struct{ sub, name, cmd string }{
		{"seqread", "sequential read 256 MiB", "cat DIR/big.bin"},
		{"find", "find + stat, 10,000 files", "find DIR/tree -path '*/.git' -prune -o -type f -printf '%s %T@\\n'"},
		{"gitstatus", "git status, 10,000 files", "git -C DIR/tree status --porcelain"},
	} {
		t.Run(m.sub, func(t *testing.T) {
			var res [2][2]time.Duration // [disk, mount][cold, warm]
			for i, dir := range []string{"/root", "/mnt/src"} {
				cmd := strings.ReplaceAll(m.cmd, "DIR", dir)
				sh(t, dropCaches)
				res[i][0] = timed(t, cmd)
				res[i][1] = timed(t, cmd)
			}
			for j, kind := range []string{"cold", "warm"} {
				disk, mnt := res[0][j], res[1][j]
				extra := ""
				if m.sub == "seqread" {
					extra = fmt.Sprintf(" (%.1f MB/s vs %.1f MB/s)", 256*1.048576/mnt.Seconds(), 256*1.048576/disk.Seconds())
				}
				t.Logf("BENCH %s, %s: `%s`: VM disk %s, mount %s: speed %.2fx the VM's disk%s", m.name, kind,
					strings.ReplaceAll(m.cmd, "DIR", "{/root,/mnt/src}"), disk.Round(time.Millisecond), mnt.Round(time.Millisecond),
					disk.Seconds()/mnt.Seconds(), extra)
			}
		})
	}
	if out, err := exec.Command("uptime").Output(); err == nil {
		t.Logf("host load: %s", strings.TrimSpace(string(out)))
	}
	d.MustCLI(ctx, "vm", "rm", "--force", "bench")
}
