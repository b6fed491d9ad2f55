// Command banger-init is banger's guest program (package guestinit) under
// the name the initramfs generator and kernelcat-build use: the /init of
// banger's initramfs, and banger's PID 1. It is the same program as
// cmd/banger-vsock-agent. Build it static:
//
//	CGO_ENABLED=0 go build ./cmd/banger-init
package main

import "github.com/bangerdev/banger/internal/guestinit"

// version is set at build time with -X main.version=...
var version = "dev"

func main() { guestinit.Main(version) }
