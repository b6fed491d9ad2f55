package guestinit

import (
	"bytes"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// shutdown stops every process (SIGTERM, termGrace, SIGKILL), syncs,
// unmounts and powers off. It never returns.
func (p *pid1) shutdown(reason string) {
	p.logf("shutting down: %s", reason)
	if !signalAll(unix.SIGTERM, termGrace) {
		p.logf("processes left %s after SIGTERM: sending SIGKILL", termGrace)
		signalAll(unix.SIGKILL, killGrace)
	}
	p.logf("powering off")
	p.closeLog()
	unix.Sync()
	if err := unmountAll(); err != nil {
		p.failf("unmount", err)
	}
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		p.failf("power off", err)
	}
	select {} // PID 1 must not exit
}

// signalAll sends sig to every process but PID 1 and waits up to grace
// for all of them to be gone (the reaper collects them). It reports
// whether they went.
func signalAll(sig unix.Signal, grace time.Duration) bool {
	_ = unix.Kill(-1, sig)
	deadline := time.Now().Add(grace)
	for {
		if userProcesses() == 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pfKthread is PF_KTHREAD in /proc/<pid>/stat's flags.
const pfKthread = 0x00200000

// userProcesses counts the live processes other than PID 1: kernel
// threads, which kill(-1, ...) also counts, and zombies, which the reaper
// is about to collect, are left out.
func userProcesses() int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == 1 {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // gone
		}
		if alive, kthread := parseStat(b); alive && !kthread {
			n++
		}
	}
	return n
}

// parseStat reads the state and flags of a /proc/<pid>/stat line.
func parseStat(b []byte) (alive, kthread bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return false, false
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 7 {
		return false, false
	}
	flags, _ := strconv.ParseUint(string(f[6]), 10, 64)
	state := f[0][0]
	return state != 'Z' && state != 'X', flags&pfKthread != 0
}
