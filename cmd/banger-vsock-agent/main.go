// Command banger-vsock-agent is banger's guest program (package guestinit):
// injected into every image, it is the guest agent when started by that
// name (banger-vsock-agent.service, or banger's PID 1) and banger's PID 1
// when the kernel or the initramfs starts it as init (through the link
// guestabi.InitPath). Build it static:
//
//	CGO_ENABLED=0 go build -ldflags='-s -w -X main.version=VERSION' ./cmd/banger-vsock-agent
package main

import "github.com/bangerdev/banger/internal/guestinit"

// version is set at build time with -X main.version=...
var version = "dev"

func main() { guestinit.Main(version) }
