// Package guestabi is the contract between banger's host side and its guest
// side, as pure data: where banger's files live inside a guest, the kernel
// command line the daemon writes and the guest reads (Cmdline, with Encode
// and Parse used by both ends), the agent's transport port and serial port
// names, and the first-boot states.
//
// Nothing here touches the system. The host (daemon, VM monitors, image
// pull) and the guest program (cmd/banger-init: initramfs init, PID 1 and
// agent) import it, so a path, key or name is written once.
package guestabi

// Guest paths, absolute inside the guest. Code that works on a guest root
// other than "/" (image builds, tests) joins them under that root.
const (
	// AgentPath is banger's guest program in an image. It is one static
	// binary: started by that name it is the agent; as PID 1 it is banger's
	// init (see InitPath).
	AgentPath = "/usr/local/bin/banger-vsock-agent"
	// LibDir holds banger's other guest files.
	LibDir = "/usr/local/lib/banger"
	// InitPath is banger's PID 1 inside an image: a symbolic link to
	// AgentPath. The initramfs switches to it, and a boot without an
	// initramfs passes it as init=, when the image's own init is not used.
	InitPath = LibDir + "/init"
	// FirstBootScript installs an SSH server on first boot.
	FirstBootScript = LibDir + "/first-boot.sh"
	// ImageConfigFile is the image's OCI run configuration (ImageConfig, JSON)
	// that banger's PID 1 runs as the main process.
	ImageConfigFile = "/etc/banger/image.json"
	// ModulesList is the module load order inside banger's initramfs.
	ModulesList = "/etc/banger/modules"

	// StateDir holds banger's persistent guest state.
	StateDir = "/var/lib/banger"
	// FirstBootMarker exists until first boot has succeeded.
	FirstBootMarker = StateDir + "/first-boot-pending"
	// FirstBootStatus holds one FirstBootState.
	FirstBootStatus = StateDir + "/first-boot-status"
	// FirstBootLog is the first-boot service's log.
	FirstBootLog = "/var/log/banger-first-boot.log"
	// MainLog receives the main process's output (also on the console).
	MainLog = "/var/log/banger-main.log"
	// InitLog receives banger's PID 1 messages (also on the console).
	InitLog = "/var/log/banger-init.log"

	// RunDir holds banger's per-boot guest state (a tmpfs under /run).
	RunDir = "/run/banger"
	// MainStateFile is the main process's MainState (JSON), rewritten by
	// banger's PID 1 on every change.
	MainStateFile = RunDir + "/main.json"
	// InitFile names the init that runs the guest (an Init), written at
	// boot by banger's initramfs or PID 1.
	InitFile = RunDir + "/init"

	// HostKey is the guest's ed25519 SSH host public key, which the agent
	// reports and the host pins.
	HostKey = "/etc/ssh/ssh_host_ed25519_key.pub"
	// AuthorizedKeys is root's authorized_keys, which the agent appends to.
	AuthorizedKeys = "/root/.ssh/authorized_keys"
)

// MainConsolePrefix starts every console line of the main process's
// output, so the host can tell it from kernel and init messages
// (banger vm logs --main); MainLog holds the output untagged.
const MainConsolePrefix = "main| "

// Agent transport names.
const (
	// AgentVsockPort is the AF_VSOCK port the agent listens on.
	AgentVsockPort uint32 = 1024
	// AgentSerialPort is the name of the virtio-serial port the agent
	// serves on (QEMU: -device virtserialport,name=org.banger.agent). The
	// guest finds it through /sys/class/virtio-ports/*/name.
	AgentSerialPort = "org.banger.agent"
)

// FirstBootState is the progress of the guest's first-boot service.
type FirstBootState string

// First-boot states. The first-boot service writes one of pending, running,
// done, failed or skipped to FirstBootStatus; the agent falls back to
// FirstBootMarker when that file is absent (marker present: pending;
// absent: done) and reports unknown for any other content.
const (
	FirstBootPending FirstBootState = "pending"
	FirstBootRunning FirstBootState = "running"
	FirstBootDone    FirstBootState = "done"
	FirstBootFailed  FirstBootState = "failed"
	// FirstBootSkipped: nothing to install, or no way to (no package
	// manager, no route out); the reason is in FirstBootLog. The VM is
	// ready all the same.
	FirstBootSkipped FirstBootState = "skipped"
	FirstBootUnknown FirstBootState = "unknown"
)

// Valid reports whether s is a state a guest may write.
func (s FirstBootState) Valid() bool {
	switch s {
	case FirstBootPending, FirstBootRunning, FirstBootDone, FirstBootFailed, FirstBootSkipped:
		return true
	}
	return false
}

// Settled reports whether first boot will make no more progress this boot.
func (s FirstBootState) Settled() bool {
	return s == FirstBootDone || s == FirstBootFailed || s == FirstBootSkipped
}
