package guestinit

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/mounts"
	"github.com/bangerdev/banger/internal/portfwd"
)

// RunAgent runs the guest agent with the command-line arguments args and
// returns the exit status. It serves AF_VSOCK port guestabi.AgentVsockPort
// when /dev/vsock exists and the virtio-serial port guestabi.AgentSerialPort
// when that exists, waiting for either to appear, and logs to stderr.
func RunAgent(version string, args []string) int {
	fs := flag.NewFlagSet("banger-vsock-agent", flag.ContinueOnError)
	root := fs.String("root", "/", "guest root filesystem the agent reads and writes under")
	port := fs.Uint("vsock-port", uint(guestabi.AgentVsockPort), "AF_VSOCK port to listen on")
	serial := fs.String("serial-port", guestabi.AgentSerialPort, "name of the virtio-serial port to serve (empty: none)")
	noVsock := fs.Bool("no-vsock", false, "do not listen on AF_VSOCK")
	retry := fs.Duration("retry", time.Second, "how often to look again for a missing vsock device or serial port")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *showVersion {
		fmt.Println(version)
		return 0
	}
	if *port > 1<<32-1 {
		fmt.Fprintf(os.Stderr, "banger-vsock-agent: -vsock-port %d is out of range\n", *port)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	logger := log.New(os.Stderr, "", 0)
	srv := agent.NewServer(*root, version)
	srv.Log = logger
	srv.PowerOff = agentPowerOff
	if exe, err := os.Executable(); err == nil {
		srv.SFTPServer = []string{exe, SFTPServerMode}
	} else {
		logger.Printf("find the guest program for sftp as other users: %v (falling back to the image's sftp-server)", err)
	}
	folders := &mounts.Guest{Log: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	srv.Services = map[string]agent.StreamService{
		portfwd.ServiceName: (&portfwd.Guest{}).ServeStream,
		mounts.ServiceName:  folders.ServeStream,
	}
	logger.Printf("banger-vsock-agent %s (protocol v%d) starting (kernel up %s)", version, agent.ProtocolVersion, uptime())
	// The host folders are mounted at boot, beside serving (the host's
	// wait for the agent does not depend on them); systemd is told the
	// agent is ready once they are, so the units after it find them.
	go func() {
		if *root == "/" {
			mountFoldersAtBoot(folders, logger)
		}
		if err := notifyReady(); err != nil {
			logger.Printf("tell systemd the agent is ready: %v", err)
		}
	}()
	if !hasSSHD(*root) {
		// The way in is the agent's own SSH server: make its host key now,
		// while the host is still connecting, not on its first status
		// request. (With an sshd, its host keys are the image's or PID 1's.)
		go func() {
			if err := srv.EnsureHostKey(); err != nil {
				logger.Printf("make ssh host key: %v", err)
			}
		}()
	}

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
	return 0
}

// mountFoldersAtBoot mounts the VM's host folders named on the kernel
// command line (guestabi.KeyMounts); the host serves them once it has the
// agent. Accesses wait until then (mounts.Guest.MountAtBoot).
func mountFoldersAtBoot(g *mounts.Guest, logger *log.Logger) {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		logger.Printf("host folders at boot: %v", err)
		return
	}
	c, _ := guestabi.Parse(string(b)) // a bad key elsewhere leaves Mounts as parsed
	var specs []mounts.Spec
	for _, m := range c.Mounts {
		specs = append(specs, mounts.Spec{GuestDir: m.Dir, ReadOnly: m.ReadOnly})
	}
	for _, err := range g.MountAtBoot(specs, 0) {
		logger.Printf("host folders at boot: %v", err)
	}
}

// notifyReady sends READY=1 to systemd when it started the agent as a
// Type=notify service ($NOTIFY_SOCKET), and does nothing otherwise.
func notifyReady() error {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte("READY=1"))
	return err
}

// agentPowerOff asks banger's PID 1 to shut the guest down when it runs the
// guest, else powers off as agent.PowerOffGuest does (systemd, or sync and
// reboot).
func agentPowerOff() (string, error) {
	if runningBangerInit() {
		time.AfterFunc(200*time.Millisecond, func() { _ = syscall.Kill(1, sigPoweroff) })
		return "banger-init", nil
	}
	return agent.PowerOffGuest()
}

// runningBangerInit reports whether PID 1 is banger's init: it records
// itself in guestabi.InitFile at start.
func runningBangerInit() bool {
	b, err := os.ReadFile(guestabi.InitFile)
	return err == nil && strings.TrimSpace(string(b)) == string(guestabi.InitBanger)
}

// hasSSHD reports whether the image under root has an sshd.
func hasSSHD(root string) bool {
	for _, p := range sshdPaths {
		if st, err := os.Stat(filepath.Join(root, p)); err == nil && st.Mode().IsRegular() {
			return true
		}
	}
	return false
}
