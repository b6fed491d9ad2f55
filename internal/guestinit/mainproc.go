package guestinit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/guestabi"
)

// mainSpec is the main process, resolved in the image.
type mainSpec struct {
	path string
	argv []string
	env  []string
	dir  string
	acct account
}

// resolveMain reads the image's run config under root, applies the
// command line's override and resolves argv[0], the user and the
// environment. errNoMain means there is nothing to run.
func resolveMain(root string, override guestabi.MainOverride) (mainSpec, error) {
	var cfg guestabi.ImageConfig
	b, err := os.ReadFile(root + guestabi.ImageConfigFile) //nolint:gosec // fixed guest path
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return mainSpec{}, fmt.Errorf("read %s: %w", guestabi.ImageConfigFile, err)
	default:
		if err := json.Unmarshal(b, &cfg); err != nil {
			return mainSpec{}, fmt.Errorf("read %s: %w", guestabi.ImageConfigFile, err)
		}
	}
	cfg = override.Apply(cfg)
	argv := cfg.Argv()
	if len(argv) == 0 {
		return mainSpec{}, errNoMain
	}
	acct, err := lookupUser(root, cfg.User)
	if err != nil {
		return mainSpec{argv: argv}, err
	}
	env := guestabi.MergeEnv([]string{"PATH=" + defaultPath, "HOME=" + acct.home}, cfg.Env)
	if h, err := os.Hostname(); err == nil && root == "/" {
		env = guestabi.MergeEnv([]string{"HOSTNAME=" + h}, env)
	}
	path, err := lookPath(root, argv[0], env)
	if err != nil {
		return mainSpec{argv: argv}, err
	}
	dir := cfg.WorkingDir
	if dir == "" {
		dir = "/"
	}
	return mainSpec{path: path, argv: argv, env: env, dir: dir, acct: acct}, nil
}

// startMain starts the image's main process, its output going to the
// console and guestabi.MainLog, and records its state as it changes. The
// VM stays up when it exits.
func (p *pid1) startMain() {
	spec, err := resolveMain("/", p.cmdline.Main)
	if errors.Is(err, errNoMain) {
		p.logf("no main process: %v", err)
		p.setMain(guestabi.MainState{Status: guestabi.MainNone})
		return
	}
	if err != nil {
		p.failf("main process", err)
		p.setMain(guestabi.MainState{Status: guestabi.MainFailed, Argv: spec.argv, Error: oneLineErr(err)})
		return
	}
	if err := os.MkdirAll(spec.dir, 0o755); err != nil {
		p.failf("main process: working directory", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		p.failf("main process", err)
		p.setMain(guestabi.MainState{Status: guestabi.MainFailed, Argv: spec.argv, Error: oneLineErr(err)})
		return
	}
	pid, done, err := p.procs.start(spec.path, spec.argv, &syscall.ProcAttr{
		Dir: spec.dir, Env: spec.env, Files: []uintptr{devNull(), w.Fd(), w.Fd()},
		Sys: &syscall.SysProcAttr{Setsid: true, Credential: spec.acct.credential()},
	})
	_ = w.Close()
	if err != nil {
		_ = r.Close()
		p.failf("main process", err)
		p.setMain(guestabi.MainState{Status: guestabi.MainFailed, Argv: spec.argv, Error: oneLineErr(err)})
		return
	}
	p.logf("main process %d: %q as %d:%d in %s", pid, spec.argv, spec.acct.uid, spec.acct.gid, spec.dir)
	st := guestabi.MainState{Status: guestabi.MainRunning, Argv: spec.argv, PID: pid, StartedAt: time.Now().UTC()}
	p.setMain(st)
	go p.copyMainOutput(r)
	go func() {
		ws := <-done
		st.Status, st.ExitedAt = guestabi.MainExited, time.Now().UTC()
		if ws.Exited() {
			code := ws.ExitStatus()
			st.ExitCode = &code
		} else if ws.Signaled() {
			st.Signal = unix.SignalName(ws.Signal())
		}
		p.setMain(st)
		p.logf("main process %d ended (%s); the VM stays up", pid, describe(ws))
	}()
}

// copyMainOutput copies the main process's output to guestabi.MainLog as
// it is, and to the console line by line behind
// guestabi.MainConsolePrefix, until every writer has closed the pipe.
func (p *pid1) copyMainOutput(r *os.File) {
	defer r.Close()
	f, err := os.OpenFile(guestabi.MainLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		p.failf("open "+guestabi.MainLog, err)
	} else {
		defer f.Close()
	}
	console := &prefixWriter{w: os.Stdout, prefix: guestabi.MainConsolePrefix}
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if f != nil {
				_, _ = f.Write(buf[:n])
			}
			_, _ = console.Write(buf[:n])
		}
		if err != nil {
			console.flush()
			return
		}
	}
}

// prefixWriter writes whole lines, each behind prefix; a partial line
// waits for its end (or flush), up to maxLine bytes.
type prefixWriter struct {
	w       io.Writer
	prefix  string
	partial []byte
}

const maxLine = 4096

func (pw *prefixWriter) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			pw.partial = append(pw.partial, b...)
			if len(pw.partial) >= maxLine {
				pw.flush()
			}
			break
		}
		line := append(append([]byte(pw.prefix), pw.partial...), b[:i+1]...)
		pw.partial = pw.partial[:0]
		if _, err := pw.w.Write(line); err != nil {
			return n, err
		}
		b = b[i+1:]
	}
	return n, nil
}

// flush writes a pending partial line, ended with a newline.
func (pw *prefixWriter) flush() {
	if len(pw.partial) == 0 {
		return
	}
	_, _ = pw.w.Write(append(append([]byte(pw.prefix), pw.partial...), '\n'))
	pw.partial = pw.partial[:0]
}
