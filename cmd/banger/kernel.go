package main

import (
	"net/url"

	"github.com/bangerdev/banger/internal/model"
	"github.com/spf13/cobra"
)

func newKernelCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "kernel",
		Aliases: []string{"kernels"},
		Short:   "Manage guest kernels",
	}
	cmd.AddCommand(
		&cobra.Command{
			Use:   "ls",
			Short: "List kernels",
			Args:  exactArgs(0, "no arguments"),
			RunE: func(c *cobra.Command, _ []string) error {
				var ks []model.Kernel
				if err := g.client().Do(c.Context(), "GET", "/kernels", nil, &ks); err != nil {
					return err
				}
				if g.output == "json" {
					return printJSON(g.out, ks)
				}
				rows := make([][]string, 0, len(ks))
				for _, k := range ks {
					initrd := "-"
					if k.Initrd != nil {
						initrd = humanBytes(k.Initrd.Size)
					}
					rows = append(rows, []string{k.Name, k.Version, k.Format, initrd, k.Source, ago(k.Created)})
				}
				return printTable(g.out, []string{"NAME", "VERSION", "FORMAT", "INITRD", "SOURCE", "CREATED"}, rows)
			},
		},
		&cobra.Command{
			Use:   "inspect NAME",
			Short: "Show a kernel's record",
			Args:  exactArgs(1, "a kernel name"),
			RunE: func(c *cobra.Command, args []string) error {
				var k model.Kernel
				if err := g.client().Do(c.Context(), "GET", "/kernels/"+url.PathEscape(args[0]), nil, &k); err != nil {
					return err
				}
				if g.output == "json" {
					return printJSON(g.out, k)
				}
				pairs := [][2]string{
					{"name", k.Name}, {"version", k.Version}, {"arch", k.Arch}, {"format", k.Format},
					{"kernel", k.Kernel.Path + " (sha256 " + k.Kernel.SHA256 + ")"},
				}
				if k.Initrd != nil {
					pairs = append(pairs, [2]string{"initrd", k.Initrd.Path + " (sha256 " + k.Initrd.SHA256 + ")"})
				}
				if k.Modules != nil {
					pairs = append(pairs, [2]string{"modules", k.Modules.Path})
				}
				pairs = append(pairs, [2]string{"source", k.Source}, [2]string{"source ref", k.SourceRef},
					[2]string{"created", k.Created.Format("2006-01-02 15:04:05 MST")})
				return printKV(g.out, pairs)
			},
		},
		rmCmd(g, "kernel", "/kernels/"),
		newKernelImportCmd(g),
		newKernelPullCmd(g),
	)
	return cmd
}
