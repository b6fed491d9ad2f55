package e2etest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/bangerdev/banger/internal/atomicfile"
)

// Root is the fixed directory under which every harness run keeps all of its
// files: BANGER_E2E_ROOT overrides it (the harness's own tests use that to
// sweep a private root). It is not derived from TMPDIR, because the harness
// points TMPDIR into its run directory: a nested test binary must find the
// same root.
func Root() string {
	if r := os.Getenv("BANGER_E2E_ROOT"); r != "" {
		return r
	}
	return "/tmp/banger-e2e"
}

// EnvRun is the environment variable that marks every process a harness run
// starts: the test binary sets it, so the daemon, the registry, busybox
// httpd and the VM monitors the daemon starts all inherit it. The start-up
// sweep kills processes whose environment names a dead run.
const EnvRun = "BANGER_E2E_RUN"

// netnsPrefix starts the name of every network namespace the harness makes:
// bgr-e2e-<run id>-<n>.
const netnsPrefix = "bgr-e2e-"

// The current run: its id and directory (Root()/<id>), set by Main when the
// binary runs as root.
var current struct {
	id, dir string
}

// RunID returns the id of this run ("" outside Main or without root).
func RunID() string { return current.id }

// RunDir returns this run's directory under Root ("" outside Main or
// without root). TMPDIR points at its tmp subdirectory, so t.TempDir and
// os.MkdirTemp land inside it.
func RunDir() string { return current.dir }

// Main is the TestMain of every end-to-end package:
//
//	func TestMain(m *testing.M) { e2etest.Main(m) }
//
// As root it first clears what earlier runs that died left behind (see
// Sweep), then registers this run: a directory under Root holding an owner
// record (pid, process start time, boot id), TMPDIR pointed inside it, and
// EnvRun set so every helper process carries the run's id. When the tests
// end, or on SIGINT or SIGTERM, it removes whatever of this run is still
// there, VM monitors included.
// Without root it only runs the tests (they skip through internal/testutil).
func Main(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		return m.Run()
	}
	if err := begin(); err != nil {
		fmt.Fprintf(os.Stderr, "e2etest: %v\n", err)
		return 1
	}
	// Ctrl-C or SIGTERM: the tests' own clean-ups will not run, so clear
	// the whole run now rather than leave it to the next start.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		sig := <-sigs
		fmt.Fprintf(os.Stderr, "e2etest: %v: clearing run %s\n", sig, current.id)
		if err := end(); err != nil {
			fmt.Fprintf(os.Stderr, "e2etest: clean up run %s: %v\n", current.id, err)
		}
		os.Exit(1)
	}()
	code := m.Run()
	signal.Stop(sigs)
	if err := end(); err != nil {
		fmt.Fprintf(os.Stderr, "e2etest: clean up run %s: %v\n", current.id, err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// begin sweeps stale runs and registers this one, holding the root's lock so
// that a sweeper never sees a run half registered.
func begin() error {
	root := Root()
	unlock, err := lockRoot(root)
	if err != nil {
		return err
	}
	defer unlock()
	rep, err := sweep(root, func(id string) bool { return !runAlive(root, id) })
	report(rep)
	if err != nil {
		return fmt.Errorf("clear stale leftovers under %s: %w", root, err)
	}
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	id := hex.EncodeToString(b[:])
	dir := filepath.Join(root, id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("create run dir: %w", err)
	}
	o, err := self()
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, "owner"), []byte(o.String()), 0o600); err != nil {
		return fmt.Errorf("record run owner: %w", err)
	}
	tmp := filepath.Join(dir, "tmp")
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return err
	}
	current.id, current.dir = id, dir
	if err := os.Setenv("TMPDIR", tmp); err != nil {
		return err
	}
	return os.Setenv(EnvRun, id)
}

// end removes what is left of this run.
func end() error {
	root := Root()
	unlock, err := lockRoot(root)
	if err != nil {
		return err
	}
	defer unlock()
	rep, err := sweep(root, func(id string) bool { return id == current.id })
	if len(rep.killed) > 0 || len(rep.netns) > 0 || len(rep.mounts) > 0 || len(rep.loops) > 0 {
		// Tests clean up after themselves; what is left here was leaked by
		// a test (or left by a failed one) and is worth a line.
		report(rep)
	}
	return err
}

func report(r sweepReport) {
	for _, line := range r.lines() {
		fmt.Fprintf(os.Stderr, "e2etest: %s\n", line)
	}
}

// lockRoot creates root if needed (refusing one that is not a root-owned
// directory: another user could have planted it) and takes its lock.
func lockRoot(root string) (func(), error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", root, err)
	}
	fi, err := os.Lstat(root)
	if err != nil {
		return nil, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok || st.Uid != 0 || fi.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("%s is not a directory owned by root and writable only by it (mode %s): remove it", root, fi.Mode())
	}
	f, err := os.OpenFile(filepath.Join(root, ".lock"), os.O_CREATE|os.O_RDWR|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("lock %s: %w", root, err)
	}
	return func() { _ = f.Close() }, nil
}

// owner identifies the test binary that made a run: a pid is reused, a pid
// with the same start time on the same boot is not.
type owner struct {
	PID    int
	Start  uint64
	BootID string
}

func (o owner) String() string { return fmt.Sprintf("%d %d %s\n", o.PID, o.Start, o.BootID) }

func parseOwner(s string) (owner, error) {
	f := strings.Fields(s)
	if len(f) != 3 {
		return owner{}, fmt.Errorf("owner record %q: want pid, start time, boot id", s)
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil {
		return owner{}, err
	}
	start, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return owner{}, err
	}
	return owner{PID: pid, Start: start, BootID: f[2]}, nil
}

func self() (owner, error) {
	start, err := procStart(os.Getpid())
	if err != nil {
		return owner{}, err
	}
	boot, err := bootID()
	if err != nil {
		return owner{}, err
	}
	return owner{PID: os.Getpid(), Start: start, BootID: boot}, nil
}

// runAlive reports whether run id's owner still runs. A run whose directory
// or owner record is missing or unreadable is dead: runs are registered
// under the root's lock, so no sweeper sees one half made.
func runAlive(root, id string) bool {
	if !runIDRE.MatchString(id) {
		return false
	}
	raw, err := os.ReadFile(filepath.Join(root, id, "owner")) // #nosec G703 -- id is 8 hex digits
	if err != nil {
		return false
	}
	o, err := parseOwner(string(raw))
	if err != nil {
		return false
	}
	if boot, err := bootID(); err != nil || boot != o.BootID {
		return false
	}
	start, err := procStart(o.PID)
	return err == nil && start == o.Start
}

// procStart returns a process's start time (field 22 of /proc/pid/stat, in
// clock ticks since boot).
func procStart(pid int) (uint64, error) {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc/pid/stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0, errors.New("short /proc/pid/stat")
	}
	return strconv.ParseUint(f[19], 10, 64)
}

func bootID() (string, error) {
	raw, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(raw)), err
}
