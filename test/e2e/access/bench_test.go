package access

import (
	"context"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
	"github.com/bangerdev/banger/test/e2e/e2etest"
)

// TestBenchAccess compares, in one run on one guest (the standard Debian
// test image, with sshd and its network): banger exec VM true against ssh
// to the image's sshd over the guest network running true (50 runs each,
// p50 and p99), and banger cp of a 256 MiB file in and out against scp over
// the guest network. It runs only with BANGER_BENCH=1 (make bench).
func TestBenchAccess(t *testing.T) {
	testutil.OptIn(t, "BANGER_BENCH", "benchmark (make bench)")
	testutil.RequiresTool(t, "ssh", "scp")
	e := e2etest.Setup(t, nil)
	d := e.D
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	d.MustCLI(ctx, "vm", "create", "--image", e.Image, "--name", "bench", "--memory", "1G")
	d.MustCLI(ctx, "vm", "start", "bench", "--wait")
	d.MustCLI(ctx, "ssh", "--via", "network", "bench", "--", "true") // pins the host key
	vm := e2etest.Inspect(ctx, t, d, "bench")
	key := filepath.Join(d.SSHDir(), "id_ed25519")
	kh := filepath.Join(d.SSHDir(), "known_hosts-"+vm.ID)
	sshOpts := []string{"-i", key, "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "UserKnownHostsFile=" + kh,
		"-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=" + vm.Name,
		"-o", "BatchMode=yes", "-o", "LogLevel=ERROR"}
	timeIt := func(name string, args ...string) time.Duration {
		t.Helper()
		c := e.NS.Cmd(name, args...)
		c.Env = append(os.Environ(), "BANGER_SSH_DIR="+d.SSHDir())
		start := time.Now()
		if out, err := e2etest.CombinedOutput(c); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return time.Since(start)
	}
	const runs = 50
	var execT, sshT []time.Duration
	for range runs {
		execT = append(execT, timeIt(d.Bin, "--socket", d.Socket, "exec", "bench", "--", "true"))
		sshT = append(sshT, timeIt("ssh", append(sshOpts, "root@"+vm.IP, "true")...))
	}
	ep50, ep99 := pct(execT, 50), pct(execT, 99)
	sp50, sp99 := pct(sshT, 50), pct(sshT, 99)
	t.Logf("BENCH exec true: p50 %s p99 %s; ssh (network, sshd) true: p50 %s p99 %s; exec p50 / ssh p50 = %.2f (goal <= 0.5)",
		ep50, ep99, sp50, sp99, float64(ep50)/float64(sp50))

	dir := t.TempDir()
	big := filepath.Join(dir, "big")
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	const size = 256 << 20
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	mbps := func(d time.Duration) float64 { return size / 1e6 / d.Seconds() }
	cpIn := timeIt(d.Bin, "--socket", d.Socket, "cp", "-q", big, "bench:/root/big.cp")
	cpOut := timeIt(d.Bin, "--socket", d.Socket, "cp", "-q", "bench:/root/big.cp", filepath.Join(dir, "big.cp"))
	scpIn := timeIt("scp", append(sshOpts, big, "root@"+vm.IP+":/root/big.scp")...)
	scpOut := timeIt("scp", append(sshOpts, "root@"+vm.IP+":/root/big.scp", filepath.Join(dir, "big.scp"))...)
	t.Logf("BENCH cp 256 MiB: in %.1f MB/s, out %.1f MB/s; scp (network): in %.1f MB/s, out %.1f MB/s; cp/scp in %.2f, out %.2f (goal >= 1)",
		mbps(cpIn), mbps(cpOut), mbps(scpIn), mbps(scpOut), scpIn.Seconds()/cpIn.Seconds(), scpOut.Seconds()/cpOut.Seconds())
	for _, p := range []string{"big.cp", "big.scp"} {
		if a, b := mustRead(t, big), mustRead(t, filepath.Join(dir, p)); len(a) != len(b) || !slices.Equal(a, b) {
			t.Errorf("%s differs from what was copied in", p)
		}
	}
	d.MustCLI(ctx, "vm", "rm", "--force", "bench")
}

// pct is the p-th percentile (nearest rank) of ds.
func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (p*len(s)+99)/100 - 1
	return s[max(0, min(i, len(s)-1))].Round(time.Millisecond)
}
