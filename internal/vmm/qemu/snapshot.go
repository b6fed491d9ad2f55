package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
)

// StateFileName is the migration stream's file name inside a snapshot dir.
const StateFileName = "qemu-state"

// Snapshot tuning. QEMU 7.2 has no file: migration URI (that came with
// 8.2), and exec: would hand a path to a shell; banger opens the file
// itself and passes the descriptor over QMP (getfd, then migrate "fd:").
const (
	snapFDName    = "banger-snapshot"
	restoreFDName = "banger-restore"
	// Pre-copy runs with the guest live; QEMU stops it for the last pass
	// once the rest fits in downtimeLimit. A guest that dirties memory
	// faster than it is written is stopped after convergeWait instead.
	downtimeLimitMS = 100
	convergeWait    = 20 * time.Second
	maxBandwidth    = 8 << 30 // bytes/s: a local file, not a network link
	pollInterval    = 10 * time.Millisecond
)

var _ vmm.Snapshotter = (*Monitor)(nil)

// migrationInfo is the part of query-migrate banger reads.
type migrationInfo struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
	Downtime  int64  `json:"downtime"` // ms, once completed
}

// Snapshot implements vmm.Snapshotter: a live pre-copy migration of the
// guest into <dir>/qemu-state. QEMU pauses the guest for the final pass;
// banger then runs req.WhilePaused (the disk copy) and resumes it with
// cont. The pause is measured from QEMU's STOP event to the resume.
func (m *Monitor) Snapshot(ctx context.Context, h vmm.Handle, req vmm.SnapshotRequest) (res vmm.SnapshotResult, err error) {
	fail := func(format string, a ...any) error {
		return fmt.Errorf("snapshot qemu pid %d: %w", h.PID, fmt.Errorf(format, a...))
	}
	if alive, aerr := vmm.Alive(h); aerr != nil || !alive {
		return res, fail("%w", vmm.ErrNotRunning)
	}
	q, err := DialQMP(ctx, h.APISocket)
	if err != nil {
		return res, fail("%w", err)
	}
	defer q.Close()
	var ver struct {
		QEMU    struct{ Major, Minor, Micro int } `json:"qemu"`
		Package string                            `json:"package"`
	}
	if err := q.Execute(ctx, "query-version", nil, &ver); err != nil {
		return res, fail("%w", err)
	}
	res.Version = versionString(fmt.Sprintf("%d.%d.%d", ver.QEMU.Major, ver.QEMU.Minor, ver.QEMU.Micro), ver.Package)
	var kvm struct {
		Enabled bool `json:"enabled"`
	}
	if err := q.Execute(ctx, "query-kvm", nil, &kvm); err != nil {
		return res, fail("%w", err)
	}
	res.Accel = "tcg"
	if kvm.Enabled {
		res.Accel = "kvm"
	}
	st, err := q.QueryStatus(ctx)
	if err != nil {
		return res, fail("%w", err)
	}
	if st.Status != "running" {
		return res, fail("guest status is %q: only a running guest is saved (%w)", st.Status, vmm.ErrNotRunning)
	}
	var mi migrationInfo
	if err := q.Execute(ctx, "query-migrate", nil, &mi); err != nil {
		return res, fail("%w", err)
	}
	if mi.Status == "active" || mi.Status == "setup" || mi.Status == "device" {
		return res, fail("a migration is already %s (another snapshot of this VM is running)", mi.Status)
	}

	path := filepath.Join(req.Dir, StateFileName)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600) //nolint:gosec // the daemon's snapshot dir
	if err != nil {
		return res, fail("create state file: %w", err)
	}
	defer f.Close()
	// Whatever fails from here on: no state file, and the guest runs.
	defer func() {
		if err != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			_ = q.Execute(cctx, "migrate_cancel", nil, nil)
			if rerr := resume(cctx, q); rerr != nil {
				err = fmt.Errorf("%w; and the guest could not be resumed: %w", err, rerr)
			}
			_ = os.Remove(path)
		}
	}()
	params := map[string]any{"downtime-limit": downtimeLimitMS, "max-bandwidth": maxBandwidth}
	if err := q.Execute(ctx, "migrate-set-parameters", params, nil); err != nil {
		return res, fail("%w", err)
	}
	if err := q.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": snapFDName}, nil, f); err != nil {
		return res, fail("%w", err)
	}
	if err := q.Execute(ctx, "migrate", map[string]any{"uri": "fd:" + snapFDName}, nil); err != nil {
		_ = q.Execute(ctx, "closefd", map[string]any{"fdname": snapFDName}, nil)
		return res, fail("%w", err)
	}
	begin := time.Now()
	forced := false
	for {
		if err := q.Execute(ctx, "query-migrate", nil, &mi); err != nil {
			return res, fail("%w", err)
		}
		switch mi.Status {
		case "completed":
		case "failed", "cancelled":
			return res, fail("migration %s: %s", mi.Status, mi.ErrorDesc)
		default:
			if !forced && time.Since(begin) > convergeWait {
				// The guest dirties memory faster than it is saved:
				// stop it so the last pass can finish.
				forced = true
				if err := q.Execute(ctx, "stop", nil, nil); err != nil {
					return res, fail("%w", err)
				}
			}
			select {
			case <-ctx.Done():
				return res, fail("%w", ctx.Err())
			case <-time.After(pollInterval):
			}
			continue
		}
		break
	}
	paused := stopTime(q.Events(), begin)
	if err := f.Sync(); err != nil {
		return res, fail("sync state file: %w", err)
	}
	if req.WhilePaused != nil {
		if err := req.WhilePaused(ctx); err != nil {
			return res, fail("%w", err)
		}
	}
	res.Files = []string{StateFileName}
	if req.KeepPaused {
		res.Pause = time.Since(paused)
		return res, nil
	}
	if err := q.Execute(ctx, "cont", nil, nil); err != nil {
		return res, fail("resume: %w", err)
	}
	res.Pause = time.Since(paused)
	return res, nil
}

// stopTime is when QEMU stopped the guest (its STOP event), or since when
// it must have been stopped at the latest.
func stopTime(events []Event, fallback time.Time) time.Time {
	for _, ev := range events {
		if ev.Name == "STOP" && !ev.Time.IsZero() {
			return ev.Time
		}
	}
	return fallback
}

// resume cancels a migration in flight and makes a paused guest run.
func resume(ctx context.Context, q *QMP) error {
	var mi migrationInfo
	if err := q.Execute(ctx, "query-migrate", nil, &mi); err == nil {
		switch mi.Status {
		case "setup", "active", "device", "pre-switchover", "cancelling":
			_ = q.Execute(ctx, "migrate_cancel", nil, nil)
			for mi.Status != "cancelled" && mi.Status != "failed" && mi.Status != "completed" && ctx.Err() == nil {
				time.Sleep(pollInterval)
				if q.Execute(ctx, "query-migrate", nil, &mi) != nil {
					break
				}
			}
		}
	}
	st, err := q.QueryStatus(ctx)
	if err != nil {
		return err
	}
	if st.Running {
		return nil
	}
	switch st.Status {
	case "paused", "postmigrate", "finish-migrate", "prelaunch":
		return q.Execute(ctx, "cont", nil, nil)
	}
	return fmt.Errorf("guest status %q cannot be resumed", st.Status)
}

// Resume implements vmm.Snapshotter.
func (m *Monitor) Resume(ctx context.Context, h vmm.Handle) error {
	if alive, err := vmm.Alive(h); err != nil || !alive {
		return fmt.Errorf("resume qemu pid %d: %w", h.PID, vmm.ErrNotRunning)
	}
	q, err := DialQMP(ctx, h.APISocket)
	if err != nil {
		return fmt.Errorf("resume qemu pid %d: %w", h.PID, err)
	}
	defer q.Close()
	if err := resume(ctx, q); err != nil {
		return fmt.Errorf("resume qemu pid %d: %w", h.PID, err)
	}
	return nil
}

// Restore implements vmm.Snapshotter: QEMU starts with -incoming defer,
// receives the state file's descriptor (getfd) and loads it with
// migrate-incoming; it runs the guest as soon as the stream is loaded.
func (m *Monitor) Restore(ctx context.Context, spec vmm.Spec, dir string) (vmm.Handle, error) {
	path := filepath.Join(dir, StateFileName)
	f, err := os.Open(path) //nolint:gosec // the daemon's snapshot dir
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("restore qemu for VM %q: %w", spec.Name, err)
	}
	defer f.Close()
	return m.launch(ctx, spec, "restore", func(ctx context.Context, q *QMP) error {
		if err := q.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": restoreFDName}, nil, f); err != nil {
			return err
		}
		if err := q.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + restoreFDName}, nil); err != nil {
			return err
		}
		for {
			// A stream QEMU cannot load makes it exit ("load of
			// migration failed"); the launcher reports the log.
			st, err := q.QueryStatus(ctx)
			if err != nil {
				return fmt.Errorf("load %s: %w", path, err)
			}
			if st.Running {
				return nil
			}
			if st.Status != "inmigrate" && st.Status != "prelaunch" && st.Status != "paused" {
				return fmt.Errorf("load %s: guest status %q", path, st.Status)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("load %s: %w", path, ctx.Err())
			case <-time.After(pollInterval):
			}
		}
	}, "-incoming", "defer")
}

// Version implements vmm.Snapshotter: the first line of --version, as
// "QEMU 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)".
// The answer is kept for the binary as it is (path, inode, size, mtime),
// so that each restore does not run QEMU once more only to ask; a QEMU
// upgraded in place is asked again.
func (m *Monitor) Version(ctx context.Context) (string, error) {
	bin, err := exec.LookPath(m.Binary)
	if err != nil {
		return "", fmt.Errorf("qemu version: %w", err)
	}
	key := binaryKey(bin)
	if v, ok := versions.Load(key); ok && key != "" {
		return v.(string), nil
	}
	out, err := exec.CommandContext(ctx, bin, "--version").Output() //nolint:gosec // binary is configuration
	if err != nil {
		return "", fmt.Errorf("qemu version: %s --version: %w", bin, err)
	}
	line, _, _ := bytes.Cut(out, []byte("\n"))
	rest, ok := strings.CutPrefix(string(line), "QEMU emulator version ")
	if !ok {
		return "", fmt.Errorf("qemu version: unexpected %s --version output %q", bin, line)
	}
	num, pkg, _ := strings.Cut(rest, " ")
	pkg = strings.TrimSuffix(strings.TrimPrefix(pkg, "("), ")")
	v := versionString(num, pkg)
	if key != "" {
		versions.Store(key, v)
	}
	return v, nil
}

// versions caches Version by binaryKey.
var versions sync.Map

// binaryKey identifies one version of the file at path ("" if it cannot
// be read): its resolved path, inode, size and mtime.
func binaryKey(path string) string {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return ""
	}
	fi, err := os.Stat(real)
	if err != nil {
		return ""
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return ""
	}
	return fmt.Sprintf("%s:%d:%d:%d:%d", real, st.Dev, st.Ino, st.Size, st.Mtim.Nano())
}

// versionString is the one spelling of a QEMU version for both the
// running monitor (query-version) and the binary (--version).
func versionString(num, pkg string) string {
	pkg = strings.TrimSpace(pkg)
	if pkg == "" {
		return "QEMU " + num
	}
	return "QEMU " + num + " (" + pkg + ")"
}
