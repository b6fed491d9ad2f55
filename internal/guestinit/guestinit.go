// Package guestinit is banger's guest program: one static binary that is
// the init of banger's initramfs, the PID 1 of images without systemd, and
// the guest agent. Main picks the mode:
//
//   - PID 1 on the initramfs (a ramfs or tmpfs root): package initramfs
//     loads the virtio modules, mounts the root disk, picks the init with
//     the rule in package selection and switches to it (cmd/banger-init
//     builds that stage alone, small, for the initramfs);
//   - PID 1 on a real root file system (after that switch, or booted
//     directly with init=guestabi.InitPath): RunPID1, banger's init;
//   - any other process: the guest agent (package agent), as
//     banger-vsock-agent.service or banger's PID 1 start it, or with the
//     argument "network" the network setup banger-network.service runs in
//     systemd images (RunNetwork), or with the argument "sftp-server" an
//     SFTP server on stdin and stdout, which the agent's SSH server starts
//     as the login user for the sftp subsystem (agent.RunSFTPServer).
//
// Every failure of the init prints one line on the console,
//
//	banger-init: <what failed>: <why>
//
// Build it static: CGO_ENABLED=0 go build ./cmd/banger-vsock-agent.
package guestinit

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/guestinit/initramfs"
)

// SFTPServerMode is the argument that starts the guest program as an SFTP
// server on stdin and stdout.
const SFTPServerMode = "sftp-server"

// Main runs the mode the process was started in (see the package doc) and
// exits. version is the build's version string.
func Main(version string) {
	if os.Getpid() == 1 {
		if initramfs.OnInitramfs() {
			initramfs.Run()
		}
		RunPID1(version)
		return
	}
	name := filepath.Base(os.Args[0])
	if name == "banger-init" || name == "init" {
		fmt.Fprintln(os.Stderr, "banger-init: refusing to run: not PID 1 (this is banger's guest init; run banger-vsock-agent for the agent)")
		os.Exit(2)
	}
	if len(os.Args) > 1 && os.Args[1] == "network" {
		os.Exit(RunNetwork(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == SFTPServerMode {
		os.Exit(agent.RunSFTPServer())
	}
	os.Exit(RunAgent(version, os.Args[1:]))
}
