package main

import (
	"fmt"
	"io"
	"os"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/spf13/cobra"
)

// globals are the flags every command shares.
type globals struct {
	socket string
	output string
	out    io.Writer
	errOut io.Writer
}

func (g *globals) client() *api.Client { return api.NewClient(g.socketPath()) }

// socketPath is --socket, else $BANGER_SOCKET, else the system daemon's
// socket when it exists, else this user's default.
func (g *globals) socketPath() string {
	if g.socket != "" {
		return g.socket
	}
	if s := os.Getenv("BANGER_SOCKET"); s != "" {
		return s
	}
	sys := config.Defaults(0, "", "").Socket
	if _, err := os.Stat(sys); err == nil || os.Geteuid() == 0 {
		return sys
	}
	return config.ForCurrentProcess().Socket
}

func (g *globals) checkOutput() error {
	switch g.output {
	case "table", "json":
		return nil
	}
	return api.Errorf(api.CodeInvalid, "unknown output format %q: use -o table or -o json", g.output)
}

func newRootCmd() *cobra.Command {
	g := &globals{out: os.Stdout, errOut: os.Stderr}
	root := &cobra.Command{
		Use:           "banger",
		Short:         "Run developer VMs as microVMs on this host",
		Long:          "banger runs developer VMs as microVMs (Firecracker, or QEMU where Firecracker cannot run).\nThe banger CLI talks to the banger daemon, which runs as root and owns every host resource.",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			g.out, g.errOut = cmd.OutOrStdout(), cmd.ErrOrStderr()
			return g.checkOutput()
		},
	}
	root.PersistentFlags().StringVar(&g.socket, "socket", "", "daemon socket (default $BANGER_SOCKET, then /run/banger/banger.sock)")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return api.Errorf(api.CodeInvalid, "%v", err)
	})
	root.AddCommand(
		newVersionCmd(g),
		newDaemonCmd(g),
		newDoctorCmd(g),
		newImageCmd(g),
		newKernelCmd(g),
		newVMCmd(g),
		newSSHCmd(g),
		newMountServerCmd(g),
		newSSHConfigCmd(g),
		newExecCmd(g),
		newCpCmd(g),
		newPortCmd(g),
		newPortForwardCmd(g), // port_forward.go
		newSnapshotCmd(g),    // snapshot.go
	)
	rejectUnknownSubcommands(root)
	return root
}

// exactArgs is cobra.ExactArgs with an invalid-input error class.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) != n {
			return api.Errorf(api.CodeInvalid, "expected %s, got %d argument(s)", what, len(args))
		}
		return nil
	}
}

func warnf(g *globals, format string, args ...any) {
	fmt.Fprintf(g.errOut, format+"\n", args...)
}
