package main

import (
	"net/url"
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/spf13/cobra"
)

func newImageCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "image",
		Aliases: []string{"images"},
		Short:   "Manage root filesystem images",
	}
	cmd.AddCommand(
		&cobra.Command{
			Use:   "ls",
			Short: "List images",
			Args:  exactArgs(0, "no arguments"),
			RunE: func(c *cobra.Command, _ []string) error {
				var imgs []model.Image
				if err := g.client().Do(c.Context(), "GET", "/images", nil, &imgs); err != nil {
					return err
				}
				if g.output == "json" {
					return printJSON(g.out, imgs)
				}
				rows := make([][]string, 0, len(imgs))
				for _, i := range imgs {
					rows = append(rows, []string{i.Name, shortID(i.ID), orDash(i.Source), humanBytes(i.Size), orDash(i.Kernel), ago(i.Created), orDash(i.Ref)})
				}
				return printTable(g.out, []string{"NAME", "ID", "SOURCE", "SIZE", "KERNEL", "CREATED", "REF"}, rows)
			},
		},
		&cobra.Command{
			Use:   "inspect NAME",
			Short: "Show an image's record",
			Args:  exactArgs(1, "an image name"),
			RunE: func(c *cobra.Command, args []string) error {
				var img model.Image
				if err := g.client().Do(c.Context(), "GET", "/images/"+url.PathEscape(args[0]), nil, &img); err != nil {
					return err
				}
				if g.output == "json" {
					return printJSON(g.out, img)
				}
				boot := "none (pass --kernel-ref to banger image pull to stage a kernel)"
				if img.Boot != nil {
					boot = img.Boot.Kernel
					if img.Boot.Initrd != "" {
						boot += ", initrd " + img.Boot.Initrd
					}
				}
				return printKV(g.out, append([][2]string{
					{"name", img.Name}, {"id", img.ID}, {"source", img.Source}, {"ref", img.Ref}, {"digest", img.Digest},
					{"rootfs", img.RootFS}, {"size", humanBytes(img.Size)}, {"kernel", orDash(img.Kernel)}, {"boot", boot},
					{"created", img.Created.Format("2006-01-02 15:04:05 MST")}, {"notes", strings.Join(img.Notes, "; ")},
				}, imageGuestPairs(img)...))
			},
		},
		rmCmd(g, "image", "/images/"),
		newImagePullCmd(g),
		newImageRefreshAgentCmd(g),
		newImageCacheCmd(g),
		newImageCatalogCmd(g),
	)
	return cmd
}

// rmCmd is "rm NAME [--force]" for images and kernels.
func rmCmd(g *globals, kind, path string) *cobra.Command {
	var force bool
	c := &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove " + kind + "s",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) == 0 {
				return api.Errorf(api.CodeInvalid, "expected at least one %s name", kind)
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			var results []api.DeleteResult
			for _, name := range args {
				q := ""
				if force {
					q = "?force=true"
				}
				var res api.DeleteResult
				if err := g.client().Do(c.Context(), "DELETE", path+url.PathEscape(name)+q, nil, &res); err != nil {
					return err
				}
				results = append(results, res)
				if g.output != "json" {
					msg := "removed " + kind + " " + res.Deleted
					if res.Freed > 0 {
						msg += " (" + humanBytes(res.Freed) + " freed)"
					}
					warnf(g, "%s", msg)
				}
			}
			if g.output == "json" {
				return printJSON(g.out, results)
			}
			return nil
		},
	}
	c.Flags().BoolVar(&force, "force", false, "remove even when in use")
	return c
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
