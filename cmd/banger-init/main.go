// Command banger-init is the /init of the initramfs banger generates
// (internal/kernels/initramfs): the first stage of banger's guest program
// (package internal/guestinit/initramfs) built alone, so the initramfs
// stays small. It loads the virtio modules, mounts the root disk, picks the
// image's systemd or banger's PID 1 and switches to it. The rest of the
// guest program is cmd/banger-vsock-agent. Build it static:
//
//	CGO_ENABLED=0 go build ./cmd/banger-init
package main

import (
	"fmt"
	"os"

	"github.com/bangerdev/banger/internal/guestinit/initramfs"
)

func main() {
	if os.Getpid() != 1 || !initramfs.OnInitramfs() {
		fmt.Fprintln(os.Stderr, "banger-init: refusing to run: not PID 1 on an initramfs (this is the init of banger's guest initramfs; the guest program is banger-vsock-agent)")
		os.Exit(2)
	}
	initramfs.Run()
}
