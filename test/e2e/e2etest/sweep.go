package e2etest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/mountinfo"
)

// What a harness run can leave behind when its test binary is killed (by
// go test's -timeout, SIGKILL, or a crash), and how the sweep proves each
// thing is the harness's own before removing it:
//
//   - processes: the daemon, docker-registry and busybox httpd die with the
//     test binary (Pdeathsig, see Start), but VM monitors do not: the daemon
//     starts them with setsid so they outlive a daemon restart. A process is
//     a run's if its environment carries EnvRun=<id> or its command line
//     names a path under Root()/<id>/;
//   - network namespaces named bgr-e2e-<id>-<n>;
//   - mounts whose mount point is under Root()/<id>/;
//   - loop devices whose backing file is under Root()/<id>/;
//   - the run directory Root()/<id> itself (binaries, daemon state dirs,
//     t.TempDir, the daemon's pull scratch: TMPDIR points inside it).
//
// Nothing else is touched: a namespace, process or device that does not
// carry a run id under the harness's own prefix is never the sweep's.

var (
	runIDRE = regexp.MustCompile(`^[0-9a-f]{8}$`)
	netnsRE = regexp.MustCompile(`^` + netnsPrefix + `([0-9a-f]{8})-[0-9]+$`)
)

// netnsDir is where ip netns keeps its named namespaces.
const netnsDir = "/run/netns"

// sweepReport says what a sweep removed.
type sweepReport struct {
	runs   []string
	killed []string
	netns  []string
	mounts []string
	loops  []string
}

func (r sweepReport) lines() []string {
	var out []string
	add := func(what string, items []string) {
		if len(items) > 0 {
			out = append(out, fmt.Sprintf("%s: %s", what, strings.Join(items, ", ")))
		}
	}
	add("cleared leftovers of run(s)", r.runs)
	add("killed", r.killed)
	add("deleted network namespaces", r.netns)
	add("unmounted", r.mounts)
	add("detached loop devices", r.loops)
	return out
}

// Sweep removes every leftover of the runs under root whose owner is no
// longer alive, and returns one line per kind of thing removed. Main calls
// it at start; it is exported for the harness's own test.
func Sweep(root string) ([]string, error) {
	unlock, err := lockRoot(root)
	if err != nil {
		return nil, err
	}
	defer unlock()
	rep, err := sweep(root, func(id string) bool { return !runAlive(root, id) })
	return rep.lines(), err
}

// sweep removes the leftovers of every run id for which target is true:
// processes first (so nothing holds a mount, loop or namespace), then
// namespaces, mounts, loop devices and the run directories.
func sweep(root string, target func(id string) bool) (sweepReport, error) {
	var rep sweepReport
	var errs []error
	runs := map[string]bool{}
	consider := func(id string) bool {
		if v, ok := runs[id]; ok {
			return v
		}
		runs[id] = target(id)
		return runs[id]
	}

	// Processes.
	procs := runProcesses(root)
	var victims []int
	for _, p := range procs {
		if consider(p.run) {
			victims = append(victims, p.pid)
			rep.killed = append(rep.killed, fmt.Sprintf("pid %d (%s, run %s)", p.pid, p.comm, p.run))
			if err := syscall.Kill(p.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				errs = append(errs, fmt.Errorf("kill pid %d: %w", p.pid, err))
			}
		}
	}
	if err := waitGone(victims, 10*time.Second); err != nil {
		errs = append(errs, err)
	}

	// Network namespaces.
	ents, _ := os.ReadDir(netnsDir)
	for _, e := range ents {
		m := netnsRE.FindStringSubmatch(e.Name())
		if m == nil || !consider(m[1]) {
			continue
		}
		out, _ := exec.Command("ip", "netns", "pids", e.Name()).Output()
		var pids []int
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				pids = append(pids, pid)
			}
		}
		if err := waitGone(pids, 10*time.Second); err != nil {
			errs = append(errs, err)
		}
		if out, err := exec.Command("ip", "netns", "del", e.Name()).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %w: %s", e.Name(), err, bytes.TrimSpace(out)))
			continue
		}
		rep.netns = append(rep.netns, e.Name())
	}

	// Mounts, deepest first.
	var mounts []string
	for _, mp := range mountPoints() {
		if id := runOf(root, mp); id != "" && consider(id) {
			mounts = append(mounts, mp)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(mounts)))
	for _, mp := range mounts {
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
			continue
		}
		rep.mounts = append(rep.mounts, mp)
	}

	// Loop devices.
	backings, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, b := range backings {
		raw, err := os.ReadFile(b)
		if err != nil {
			continue
		}
		file := strings.TrimSuffix(strings.TrimSpace(string(raw)), " (deleted)")
		id := runOf(root, file)
		if id == "" || !consider(id) {
			continue
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(b)))
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("losetup -d %s (%s): %w: %s", dev, file, err, bytes.TrimSpace(out)))
			continue
		}
		rep.loops = append(rep.loops, dev+" ("+file+")")
	}

	// Run directories.
	dirs, _ := os.ReadDir(root)
	for _, e := range dirs {
		if e.IsDir() && runIDRE.MatchString(e.Name()) {
			consider(e.Name())
		}
	}
	for id, stale := range runs {
		if !stale {
			continue
		}
		if err := os.RemoveAll(filepath.Join(root, id)); err != nil {
			errs = append(errs, fmt.Errorf("remove run dir %s: %w", id, err))
		}
		rep.runs = append(rep.runs, id)
	}
	sort.Strings(rep.runs)
	return rep, errors.Join(errs...)
}

// runOf returns the run id of a path under root/<id>/, or "".
func runOf(root, path string) string {
	rest, ok := strings.CutPrefix(path, root+"/")
	if !ok {
		return ""
	}
	id, _, _ := strings.Cut(rest, "/")
	if !runIDRE.MatchString(id) {
		return ""
	}
	return id
}

// runProc is a process that carries a run's mark.
type runProc struct {
	pid  int
	run  string
	comm string
}

// runProcesses lists the processes (other than this one) that carry a run
// id: EnvRun in their environment, or a path under root/<id>/ in their
// command line.
func runProcesses(root string) []runProc {
	ents, _ := os.ReadDir("/proc")
	var out []runProc
	envKey := []byte(EnvRun + "=")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		dir := "/proc/" + e.Name()
		id := ""
		if env, err := os.ReadFile(dir + "/environ"); err == nil {
			for _, kv := range bytes.Split(env, []byte{0}) {
				if v, ok := bytes.CutPrefix(kv, envKey); ok && runIDRE.Match(v) {
					id = string(v)
				}
			}
		}
		if id == "" {
			if cmdline, err := os.ReadFile(dir + "/cmdline"); err == nil {
				for _, arg := range bytes.Split(cmdline, []byte{0}) {
					if i := bytes.Index(arg, []byte(root+"/")); i >= 0 {
						if r := runOf(root, string(arg[i:])); r != "" {
							id = r
							break
						}
					}
				}
			}
		}
		if id == "" {
			continue
		}
		comm, _ := os.ReadFile(dir + "/comm")
		out = append(out, runProc{pid: pid, run: id, comm: strings.TrimSpace(string(comm))})
	}
	return out
}

// waitGone waits until every pid has exited (or is a zombie) or the timeout
// passes.
func waitGone(pids []int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, pid := range pids {
		for alive(pid) {
			if time.Now().After(deadline) {
				return fmt.Errorf("pid %d still runs %s after SIGKILL", pid, timeout)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || len(s) < i+3 || s[i+2] != 'Z'
}

// mountPoints returns every mount point in this mount namespace.
func mountPoints() []string {
	ms, err := mountinfo.Read()
	if err != nil {
		return nil
	}
	return mountinfo.Points(ms)
}
