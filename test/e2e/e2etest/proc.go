package e2etest

import (
	"bytes"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

// Every process the harness starts is tied to the test binary: it gets
// SIGKILL when the test binary dies (Pdeathsig), however the binary dies.
//
// Linux sends the parent-death signal when the *thread* that forked the
// child exits, not the process, and Go may end an OS thread (one whose
// goroutine exited while locked to it). So every start goes through one
// goroutine locked to its thread for the life of the binary: its thread
// exits only with the process.
//
// VM monitors are the exception by design: the daemon starts them with
// setsid and no parent-death signal, so they outlive a daemon restart.
// Main's sweep (at start, and at the end of a normal run) removes those.

type startReq struct {
	cmd  *exec.Cmd
	done chan error
}

var (
	starterOnce sync.Once
	starts      chan startReq
)

func starter() {
	runtime.LockOSThread() // never unlocked: this thread lives as long as the binary
	for r := range starts {
		r.done <- r.cmd.Start()
	}
}

// Start starts cmd with SIGKILL as its parent-death signal, from the
// harness's pinned thread. Use it (or Run, Output, CombinedOutput) for
// every helper process a test starts.
func Start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	starterOnce.Do(func() {
		starts = make(chan startReq)
		go starter()
	})
	done := make(chan error, 1)
	starts <- startReq{cmd: cmd, done: done}
	return <-done
}

// Run starts cmd as Start does and waits for it.
func Run(cmd *exec.Cmd) error {
	if err := Start(cmd); err != nil {
		return err
	}
	return cmd.Wait()
}

// CombinedOutput runs cmd as Run does and returns its stdout and stderr.
func CombinedOutput(cmd *exec.Cmd) ([]byte, error) {
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := Run(cmd)
	return b.Bytes(), err
}

// Output runs cmd as Run does and returns its stdout.
func Output(cmd *exec.Cmd) ([]byte, error) {
	var b bytes.Buffer
	cmd.Stdout = &b
	err := Run(cmd)
	return b.Bytes(), err
}
