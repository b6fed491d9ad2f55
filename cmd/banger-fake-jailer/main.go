// Command banger-fake-jailer stands in for Firecracker's jailer on hosts
// without it: as strict as the jailer's documented contract, it builds the
// chroot and cgroups, pivots into the chroot, drops to the given uid and
// gid and execs the (fake) Firecracker. See package
// internal/vmm/firecracker/jailer/fakejailer.
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/vmm/firecracker/jailer/fakejailer"
)

func main() { os.Exit(fakejailer.Main(os.Args[1:])) }
