package main

import (
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/spf13/cobra"
)

func newImageCatalogCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "catalog",
		Short: "List the images of the image catalog, marking those already pulled",
		Long: "List the entries of the configured image catalog (image_catalog in the config file).\n" +
			"PULLED is yes when a local image came from the entry, outdated when the catalog has\n" +
			"a newer bundle since (pull it again with --force), and - otherwise.\n" +
			"Pull an entry with: banger image pull NAME",
		Args: exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			var list []api.CatalogListing
			if err := g.client().Do(c.Context(), "GET", "/images/catalog", nil, &list); err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(g.out, list)
			}
			rows := make([][]string, 0, len(list))
			for _, l := range list {
				pulled := "-"
				switch {
				case l.Pulled && l.Current:
					pulled = "yes"
				case l.Pulled:
					pulled = "outdated"
				}
				if len(l.Images) > 0 {
					pulled += " (" + strings.Join(l.Images, ", ") + ")"
				}
				osName := strings.TrimSpace(l.OS.ID + " " + l.OS.Version)
				rows = append(rows, []string{l.Name, orDash(osName), orDash(l.KernelRef), humanBytes(l.Bundle.Size), pulled, orDash(l.Description)})
			}
			return printTable(g.out, []string{"NAME", "OS", "KERNEL", "DOWNLOAD", "PULLED", "DESCRIPTION"}, rows)
		},
	}
}
