// Command banger-fake-firecracker stands in for firecracker on hosts that
// cannot run it. It serves Firecracker's API on --api-sock, validates every
// request against the API spec, and "boots" a pretend guest. Tests and the
// daemon's crash tests point the Firecracker backend's Binary at it. See
// package internal/vmm/firecracker/fake for what it checks.
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/vmm/firecracker/fake"
)

func main() { os.Exit(fake.Main(os.Args[1:])) }
