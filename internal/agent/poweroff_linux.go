package agent

import (
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sigPoweroff is SIGRTMIN+4 as systemd counts it (glibc's SIGRTMIN is 34):
// PID 1 starts poweroff.target on it.
const sigPoweroff = syscall.Signal(34 + 4)

// PowerOffGuest powers the guest off cleanly, 200 ms after it returns so
// that the agent can answer first: through systemd when it is PID 1, else
// by syncing and calling reboot(POWER_OFF). It runs inside the guest.
func PowerOffGuest() (string, error) {
	comm, _ := os.ReadFile("/proc/1/comm")
	if strings.TrimSpace(string(comm)) == "systemd" {
		time.AfterFunc(200*time.Millisecond, func() { _ = syscall.Kill(1, sigPoweroff) })
		return "systemd", nil
	}
	time.AfterFunc(200*time.Millisecond, func() {
		unix.Sync()
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	})
	return "poweroff", nil
}
