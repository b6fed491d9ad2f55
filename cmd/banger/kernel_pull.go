package main

import (
	"fmt"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/spf13/cobra"
)

func newKernelPullCmd(g *globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "pull NAME",
		Short: "Download a kernel from the kernel catalog (sha256-verified, resumable)",
		Args:  exactArgs(1, "a kernel catalog entry name"),
		RunE: func(c *cobra.Command, args []string) error {
			pr := newProgressRenderer(g.errOut)
			var k model.Kernel
			err := g.client().Stream(c.Context(), "POST", "/kernels/pull", api.KernelPullRequest{Name: args[0], Force: force}, pr.Func(), &k)
			pr.Close()
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(g.out, k)
			}
			fmt.Fprintf(g.out, "pulled kernel %s (%s, %s)\n", k.Name, k.Version, k.Format)
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "pull again and replace a kernel of the same name")
	return cmd
}
