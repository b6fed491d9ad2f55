package main

import (
	"github.com/bangerdev/banger/internal/mounts"
	"github.com/spf13/cobra"
)

// newMountServerCmd is the per-mount host folder server the daemon starts
// with the caller's uid and gids (internal/mounts). It is not for users.
func newMountServerCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:                "mount-server",
		Short:              "Serve one host folder to a guest (started by the daemon)",
		Hidden:             true,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if code := mounts.ServerMain(args, g.errOut); code != 0 {
				return exitError{code: code}
			}
			return nil
		},
	}
}
