package main

import (
	"fmt"
	"net/url"
	"time"

	"github.com/bangerdev/banger/internal/model"
	"github.com/spf13/cobra"
)

func newImageRefreshAgentCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "refresh-agent IMAGE",
		Short: "Put this banger's guest agent into an image without pulling it again",
		Long: "Copy the image's root filesystem, write this banger's guest agent (banger-vsock-agent),\n" +
			"its systemd units and init link into the copy, check it with e2fsck, and publish it under\n" +
			"the same name. The image's own files and first-boot state are kept. VMs made from the old\n" +
			"image keep it (as <name>.replaced-<id>); make new VMs from the refreshed one to get\n" +
			"banger exec, cp and ssh over the agent. Only the image's owner or root may.",
		Example: "  banger image refresh-agent debian-bookworm",
		Args:    exactArgs(1, "an image name"),
		RunE: func(c *cobra.Command, args []string) error {
			pr := newProgressRenderer(g.errOut)
			start := time.Now()
			var img model.Image
			err := g.client().Stream(c.Context(), "POST", "/images/"+url.PathEscape(args[0])+"/refresh-agent", nil, pr.Func(), &img)
			pr.Close()
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(g.out, img)
			}
			fmt.Fprintf(g.out, "refreshed the agent of %s (new id %s) in %s\n", img.Name, shortID(img.ID), time.Since(start).Round(100*time.Millisecond))
			fmt.Fprintf(g.out, "rootfs: %s\n", img.RootFS)
			return nil
		},
	}
}
