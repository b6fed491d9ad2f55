// Command banger-vsock-agent is banger's guest agent. It runs inside every
// VM (started by banger-vsock-agent.service) and answers the host daemon on
// AF_VSOCK port agent.DefaultPort when /dev/vsock exists and on the
// virtio-serial port agent.SerialPortName when that exists, waiting for
// either to appear. It logs to stderr (the journal). Build it static:
//
//	CGO_ENABLED=0 go build -ldflags='-s -w -X main.version=VERSION' ./cmd/banger-vsock-agent
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/agent"
)

// version is set at build time with -X main.version=...
var version = "dev"

func main() {
	root := flag.String("root", "/", "guest root filesystem the agent reads and writes under")
	port := flag.Uint("vsock-port", uint(agent.DefaultPort), "AF_VSOCK port to listen on")
	serial := flag.String("serial-port", agent.SerialPortName, "name of the virtio-serial port to serve (empty: none)")
	noVsock := flag.Bool("no-vsock", false, "do not listen on AF_VSOCK")
	retry := flag.Duration("retry", time.Second, "how often to look again for a missing vsock device or serial port")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	if *port > 1<<32-1 {
		log.Fatalf("banger-vsock-agent: -vsock-port %d is out of range", *port)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	logger := log.New(os.Stderr, "", 0)
	srv := agent.NewServer(*root, version)
	srv.Log = logger
	srv.PowerOff = agent.PowerOffGuest
	logger.Printf("banger-vsock-agent %s (protocol v%d) starting", version, agent.ProtocolVersion)

	var wg sync.WaitGroup
	run := func(name string, fn func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(); err != nil && !errors.Is(err, context.Canceled) {
				logger.Printf("%s: %v", name, err)
			}
		}()
	}
	if !*noVsock {
		run("vsock", func() error { return srv.RunVsock(ctx, uint32(*port), *retry) }) //nolint:gosec // range checked above
	}
	if *serial != "" {
		run("serial", func() error { return srv.RunSerial(ctx, *serial, *retry) })
	}
	wg.Wait()
	logger.Printf("banger-vsock-agent stopping")
}
