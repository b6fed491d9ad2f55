package vmm

import (
	"os"
	"os/exec"

	"github.com/bangerdev/banger/internal/kvm"
)

// Caps is what this host offers VM monitors.
type Caps struct {
	FirecrackerPath string // "" when firecracker is not in PATH
	QEMUPath        string // "" when qemu-system-x86_64 is not in PATH
	KVM             bool   // hardware virtualization usable (see kvm.Hardware)
	KVMReason       string // why KVM is not usable, when it is not
	VhostVsock      bool   // /dev/vhost-vsock exists (QEMU can give the guest vsock)
}

// HostCaps probes the host.
func HostCaps() Caps {
	var c Caps
	c.FirecrackerPath, _ = exec.LookPath("firecracker")
	c.QEMUPath, _ = exec.LookPath("qemu-system-x86_64")
	c.KVM, c.KVMReason = kvm.Hardware()
	_, err := os.Stat("/dev/vhost-vsock")
	c.VhostVsock = err == nil
	return c
}
