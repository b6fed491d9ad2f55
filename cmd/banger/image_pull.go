package main

import (
	"fmt"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/spf13/cobra"
)

func newImagePullCmd(g *globals) *cobra.Command {
	var req api.PullRequest
	cmd := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull an image from the catalog or any OCI registry and make it bootable",
		Long: "Pull an image and turn it into a bootable ext4 root filesystem.\n\n" +
			"A bare name (debian-bookworm) is looked up in the image catalog; anything with a registry,\n" +
			"a path or a tag (docker.io/library/alpine:3.20, ghcr.io/org/img:v2) is pulled from that OCI registry.\n" +
			"Registry credentials come from your ~/.docker/config.json and its credential helpers.",
		Example: "  banger image pull docker.io/library/debian:bookworm --kernel-ref generic-6.1\n" +
			"  banger image pull 127.0.0.1:5000/dev/debian:test --name devbox --size 4G",
		Args: exactArgs(1, "an image reference"),
		RunE: func(c *cobra.Command, args []string) error {
			req.Ref = args[0]
			pr := newProgressRenderer(g.errOut)
			start := time.Now()
			var img model.Image
			err := g.client().Stream(c.Context(), "POST", "/images/pull", req, pr.Func(), &img)
			pr.Close()
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(g.out, img)
			}
			fmt.Fprintf(g.out, "pulled %s (%s, %s) in %s\n", img.Name, img.Ref, humanBytes(img.Size), time.Since(start).Round(100*time.Millisecond))
			fmt.Fprintf(g.out, "rootfs: %s\n", img.RootFS)
			for _, n := range img.Notes {
				fmt.Fprintf(g.out, "note: %s\n", n)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Name, "name", "", "image name (default: derived from the reference, e.g. debian-bookworm)")
	f.StringVar(&req.KernelRef, "kernel-ref", "", "kernel to boot the image with (a local kernel or a kernel catalog entry)")
	f.StringVar(&req.Size, "size", "", "root filesystem size, e.g. 4G (default: content × 1.5, at least 1 GiB)")
	f.StringVar(&req.Builder, "builder", "auto", "how the root filesystem is written: direct (layers straight into ext4), staging (extract, then mkfs.ext4 -d), or auto (direct, falling back to staging)")
	f.BoolVar(&req.Force, "force", false, "replace an existing image of the same name")
	return cmd
}

func newImageCacheCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "cache", Short: "Manage the OCI layer cache"}
	cmd.AddCommand(&cobra.Command{
		Use:   "prune",
		Short: "Remove cached layer blobs that no image uses",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			var res api.PruneResult
			if err := g.client().Do(c.Context(), "POST", "/images/cache/prune", nil, &res); err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(g.out, res)
			}
			fmt.Fprintf(g.out, "removed %d blobs, freed %s\n", res.Removed, humanBytes(res.Freed))
			return nil
		},
	})
	return cmd
}
