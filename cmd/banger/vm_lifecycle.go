package main

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/sshkeys"
	"github.com/bangerdev/banger/internal/termsafe"
	"github.com/spf13/cobra"
)

// userKey returns this user's banger SSH key pair, creating it on first use.
func userKey() (*sshkeys.KeyPair, error) {
	dir, err := userSSHDir()
	if err != nil {
		return nil, err
	}
	kp, err := sshkeys.Ensure(filepath.Join(dir, "id_ed25519"), sshkeys.Options{Comment: "banger"})
	if err != nil {
		return nil, fmt.Errorf("banger ssh key: %w", err)
	}
	return kp, nil
}

// userSSHDir is where the CLI keeps this user's key and pinned host keys.
func userSSHDir() (string, error) {
	if d := os.Getenv("BANGER_SSH_DIR"); d != "" {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("find your home directory for the banger ssh key: %w", err)
	}
	return filepath.Join(home, ".local", "state", "banger", "ssh"), nil
}

func newVMCreateCmd(g *globals, use, short string, run bool) *cobra.Command {
	var req api.CreateVMRequest
	var gf guestFlags
	var mountFlags []string
	cmd := &cobra.Command{
		Use:   use + " --image IMAGE [--name NAME]",
		Short: short,
		Example: "  banger vm " + use + " --image debian-bookworm --name dev --cpus 2 --memory 2G --disk 10G\n" +
			"  banger vm " + use + " --image devbox --kernel-ref generic-6.1 --vmm qemu",
		Args: exactArgs(0, "no arguments (use --image and --name)"),
		RunE: func(c *cobra.Command, _ []string) error {
			if req.Image == "" {
				return api.Errorf(api.CodeInvalid, "--image is required (banger image ls lists the images)")
			}
			if err := gf.apply(&req, c.Flags().Changed("cmd")); err != nil {
				return err
			}
			m, err := absMounts(mountFlags)
			if err != nil {
				return err
			}
			req.Mounts = m
			kp, err := userKey()
			if err != nil {
				return err
			}
			req.SSHKey = kp.AuthorizedKey
			req.Start, req.Wait = run, run
			pr := newProgressRenderer(g.errOut)
			start := time.Now()
			var vm api.VM
			err = g.client().Stream(c.Context(), "POST", "/vms", req, pr.Func(), &vm)
			pr.Close()
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(g.out, vm)
			}
			verb := "created"
			if run {
				verb = "ready"
			}
			fmt.Fprintf(g.out, "VM %s %s in %s (ip %s, %s, disk %s)\n", vm.Name, verb, time.Since(start).Round(100*time.Millisecond), orDash(vm.IP), vm.VMM, vm.DiskDriver)
			for _, p := range vm.Ports {
				fmt.Fprintf(g.out, "published %s\n", portString(p))
			}
			if run {
				fmt.Fprintf(g.out, "connect with: banger ssh %s\n", vm.Name)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Image, "image", "", "image to boot (required)")
	f.StringVar(&req.Name, "name", "", "VM name (default: <image>-<random>)")
	f.IntVar(&req.CPUs, "cpus", 0, "virtual CPUs (default 2)")
	f.StringVar(&req.Memory, "memory", "", "memory, e.g. 2G (default 1G)")
	f.StringVar(&req.Disk, "disk", "", "disk size, e.g. 10G (default: the image's size)")
	f.StringVar(&req.KernelRef, "kernel-ref", "", "kernel (default: the image's)")
	f.StringVar(&req.VMM, "vmm", "", "VM monitor: auto, firecracker or qemu (default: the daemon's setting)")
	gf.add(f)
	addPortFlags(f, &req)
	addMountFlags(f, &mountFlags)
	return cmd
}

// vmAction runs a streamed VM action and prints the VM's new state.
func vmAction(g *globals, c *cobra.Command, name, action string, body any) error {
	pr := newProgressRenderer(g.errOut)
	var vm api.VM
	err := g.client().Stream(c.Context(), "POST", "/vms/"+url.PathEscape(name)+"/"+action, body, pr.Func(), &vm)
	pr.Close()
	if err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.out, vm)
	}
	fmt.Fprintf(g.out, "VM %s is %s\n", vm.Name, vm.State)
	return nil
}

func newVMStartCmd(g *globals) *cobra.Command {
	var wait bool
	var fromSnapshot string
	cmd := &cobra.Command{
		Use:   "start NAME",
		Short: "Start a VM",
		Args:  exactArgs(1, "a VM name"),
		RunE: func(c *cobra.Command, args []string) error {
			kp, err := userKey()
			if err != nil {
				return err
			}
			return vmAction(g, c, args[0], "start", api.StartVMRequest{SSHKey: kp.AuthorizedKey, Wait: wait, FromSnapshot: fromSnapshot})
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the VM is ready for banger ssh")
	cmd.Flags().StringVar(&fromSnapshot, "from-snapshot", "", "restore the VM from this snapshot of it instead of booting")
	return cmd
}

func newVMStopCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "stop NAME",
		Short: "Stop a VM (its disk is kept); stopping a stopped VM succeeds",
		Args:  exactArgs(1, "a VM name"),
		RunE: func(c *cobra.Command, args []string) error {
			return vmAction(g, c, args[0], "stop", nil)
		},
	}
}

func newVMRestartCmd(g *globals) *cobra.Command {
	var wait bool
	cmd := &cobra.Command{
		Use:   "restart NAME",
		Short: "Stop and start a VM",
		Args:  exactArgs(1, "a VM name"),
		RunE: func(c *cobra.Command, args []string) error {
			return vmAction(g, c, args[0], "restart", api.StartVMRequest{Wait: wait})
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the VM is ready for banger ssh")
	return cmd
}

func newVMRmCmd(g *globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove VMs: their disk, runtime files, console log and IP lease",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) == 0 {
				return api.Errorf(api.CodeInvalid, "expected at least one VM name")
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
				if err := g.client().Do(c.Context(), "DELETE", "/vms/"+url.PathEscape(name)+q, nil, &res); err != nil {
					return err
				}
				results = append(results, res)
				if g.output != "json" {
					fmt.Fprintf(g.out, "removed VM %s (%s freed)\n", res.Deleted, humanBytes(res.Freed))
				}
			}
			if g.output == "json" {
				return printJSON(g.out, results)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "stop running VMs first")
	return cmd
}

func newVMLogsCmd(g *globals) *cobra.Command {
	var follow, mainOnly, raw bool
	cmd := &cobra.Command{
		Use:   "logs NAME",
		Short: "Print a VM's serial console (terminal escapes shown as \\x1b unless --raw)",
		Args:  exactArgs(1, "a VM name"),
		RunE: func(c *cobra.Command, args []string) error {
			q := ""
			if follow {
				q = "?follow=true"
			}
			resp, err := g.client().Raw(c.Context(), http.MethodGet, "/vms/"+url.PathEscape(args[0])+"/logs"+q)
			if err != nil {
				return err
			}
			defer resp.Close()
			// The console is the guest's: a terminal must not act on the
			// escape sequences it holds.
			out := io.Writer(g.out)
			if !raw {
				safe := termsafe.NewWriter(g.out)
				defer safe.Close()
				out = safe
			}
			if mainOnly {
				err = copyMainLines(out, resp)
			} else {
				_, err = io.Copy(out, resp)
			}
			if c.Context().Err() != nil {
				return nil
			}
			return err
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output")
	cmd.Flags().BoolVar(&mainOnly, "main", false, "print only the main process's output (VMs on banger's init)")
	cmd.Flags().BoolVar(&raw, "raw", false, "print the console's bytes as they are, terminal escapes included")
	return cmd
}
