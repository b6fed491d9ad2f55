package fake

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"syscall"

	"github.com/bangerdev/banger/internal/agent"
)

// Main runs a fake Firecracker process with the command-line arguments args
// (without the program name) and returns its exit status. It is the body of
// cmd/banger-fake-firecracker, and of test binaries that re-execute
// themselves as the fake.
//
//	--api-sock PATH   the API socket (required, as for firecracker)
//	--version         print the version, as firecracker --version
//	--id ID           accepted and ignored, as firecracker's --id
//	--start-time-us N, --start-time-cpu-us N
//	                  accepted and ignored (the jailer passes them)
//	--console-flood   the booted guest writes to its console without end
//	--check-tap       PUT /network-interfaces requires /sys/class/net/<tap>
//	--agent-root DIR  guest vsock port 1024 runs banger's real guest agent
//	                  (internal/agent) over the guest root DIR
//	--agent-echo      guest vsock ports echo what they receive
//	--agent-exec PROG each guest vsock connection runs PROG [ARGS after --]
//	                  with the connection on stdin and stdout and
//	                  BANGER_VSOCK_PORT set
func Main(args []string) int {
	fs := flag.NewFlagSet("banger-fake-firecracker", flag.ContinueOnError)
	apiSock := fs.String("api-sock", "", "path of the API Unix socket")
	_ = fs.String("id", "", "instance id (ignored)")
	_ = fs.Uint64("start-time-us", 0, "the jailer's start time (ignored)")
	_ = fs.Uint64("start-time-cpu-us", 0, "the jailer's CPU start time (ignored)")
	flood := fs.Bool("console-flood", false, "the booted guest writes to its console without end")
	checkTap := fs.Bool("check-tap", false, "require the tap named in PUT /network-interfaces to exist")
	agentRoot := fs.String("agent-root", "", "serve banger's guest agent on vsock port 1024 over this guest root")
	echo := fs.Bool("agent-echo", false, "guest vsock ports echo their input")
	agentExec := fs.String("agent-exec", "", "program that serves each guest vsock connection on stdin/stdout")
	version := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *version {
		fmt.Println("Firecracker v" + Version)
		return 0
	}
	if *apiSock == "" {
		fmt.Fprintln(os.Stderr, "banger-fake-firecracker: --api-sock is required")
		return 2
	}
	// Firecracker is a Rust program, and Rust ignores SIGPIPE: a write to
	// a console pipe nobody reads fails with EPIPE instead of killing it.
	signal.Ignore(syscall.SIGPIPE)
	opts := Options{APISock: *apiSock, Console: os.Stdout, CheckTap: *checkTap, ConsoleFlood: *flood}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	switch {
	case *agentRoot != "":
		opts.Agent, opts.AgentPort = builtinAgent(ctx, *agentRoot), agent.DefaultPort
	case *agentExec != "":
		opts.Agent = execAgent(*agentExec, fs.Args())
	case *echo:
		opts.Agent = func(_ uint32, c net.Conn) {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}
	}
	srv, err := New(opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "banger-fake-firecracker:", err)
		return 1
	}
	fmt.Printf("banger-fake-firecracker: API on %s (pid %d)\n", *apiSock, os.Getpid())
	if err := srv.Serve(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "banger-fake-firecracker:", err)
		return 1
	}
	return 0
}

// builtinAgent serves the real agent protocol, as a guest running
// banger-vsock-agent would.
func builtinAgent(ctx context.Context, root string) AgentHandler {
	srv := agent.NewServer(root, "fake-firecracker")
	return func(_ uint32, c net.Conn) {
		if err := srv.ServeConn(ctx, c); err != nil {
			fmt.Fprintf(os.Stderr, "banger-fake-firecracker: agent: %v\n", err)
		}
	}
}

func execAgent(prog string, args []string) AgentHandler {
	return func(port uint32, c net.Conn) {
		defer c.Close()
		cmd := exec.Command(prog, args...) //nolint:gosec // test tool: runs what its operator names
		cmd.Stdin, cmd.Stdout, cmd.Stderr = c, c, os.Stderr
		cmd.Env = append(os.Environ(), fmt.Sprintf("BANGER_VSOCK_PORT=%d", port))
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "banger-fake-firecracker: agent on port %d: %v\n", port, err)
		}
	}
}
