package main

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/api"
)

// newSnapshotCmd is `banger snapshot ls|inspect|rm`.
func newSnapshotCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "snapshot",
		Aliases: []string{"snapshots"},
		Short:   "Manage VM snapshots (take one with banger vm snapshot)",
	}
	var force bool
	rm := &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove snapshots (refused while a VM runs from one, unless --force)",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) == 0 {
				return api.Errorf(api.CodeInvalid, "expected at least one snapshot name")
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			var removed []api.Snapshot
			for _, name := range args {
				q := ""
				if force {
					q = "?force=true"
				}
				var s api.Snapshot
				if err := g.client().Do(c.Context(), "DELETE", "/snapshots/"+url.PathEscape(name)+q, nil, &s); err != nil {
					return err
				}
				removed = append(removed, s)
				if g.output != "json" {
					fmt.Fprintf(g.out, "removed snapshot %s (%s freed)\n", s.Name, humanBytes(s.SizeOnDisk))
				}
			}
			if g.output == "json" {
				return printJSON(g.out, removed)
			}
			return nil
		},
	}
	rm.Flags().BoolVar(&force, "force", false, "remove even while VMs run from the snapshot's files")
	cmd.AddCommand(
		&cobra.Command{
			Use:   "ls",
			Short: "List snapshots (yours; root sees all)",
			Args:  exactArgs(0, "no arguments"),
			RunE: func(c *cobra.Command, _ []string) error {
				var snaps []api.Snapshot
				if err := g.client().Do(c.Context(), "GET", "/snapshots", nil, &snaps); err != nil {
					return err
				}
				if g.output == "json" {
					return printJSON(g.out, snaps)
				}
				rows := make([][]string, 0, len(snaps))
				for _, s := range snaps {
					rows = append(rows, []string{s.Name, s.SourceVM, s.Machine.Monitor, s.Machine.Image,
						strconv.Itoa(s.Machine.CPUs), strconv.Itoa(s.Machine.MemoryMiB) + " MiB", humanBytes(s.SizeOnDisk),
						ownerName(s.OwnerUID), ago(s.Created)})
				}
				return printTable(g.out, []string{"NAME", "VM", "VMM", "IMAGE", "CPUS", "MEMORY", "SIZE", "OWNER", "CREATED"}, rows)
			},
		},
		&cobra.Command{
			Use:   "inspect NAME",
			Short: "Show a snapshot's machine, files and checksums",
			Args:  exactArgs(1, "a snapshot name"),
			RunE: func(c *cobra.Command, args []string) error {
				var s api.Snapshot
				if err := g.client().Do(c.Context(), "GET", "/snapshots/"+url.PathEscape(args[0]), nil, &s); err != nil {
					return err
				}
				if g.output == "json" {
					return printJSON(g.out, s)
				}
				return printKV(g.out, snapshotPairs(s))
			},
		},
		rm,
	)
	return cmd
}

func snapshotPairs(s api.Snapshot) [][2]string {
	m := s.Machine
	pairs := [][2]string{
		{"name", s.Name}, {"id", s.ID}, {"owner", ownerName(s.OwnerUID)}, {"created", s.Created.Format(time.RFC3339)},
		{"vm", s.SourceVM}, {"vmm", m.Monitor + " (" + m.MonitorVersion + ", " + m.Accel + ")"},
		{"image", m.Image}, {"kernel", m.Kernel}, {"cpus", strconv.Itoa(m.CPUs)}, {"memory", strconv.Itoa(m.MemoryMiB) + " MiB"},
		{"devices", strings.Join(m.Devices, "; ")}, {"ip", m.IP}, {"mac", m.MAC},
		{"size", humanBytes(s.SizeOnDisk) + " on disk (" + humanBytes(s.Size) + " apparent)"},
		{"pause", s.Pause.Round(time.Millisecond).String()},
	}
	for _, f := range s.Files {
		pairs = append(pairs, [2]string{"file " + f.Name, fmt.Sprintf("%s, %s on disk, sha256 %s", f.Role, humanBytes(f.SizeOnDisk), f.SHA256)})
	}
	if len(s.Mounts) > 0 {
		pairs = append(pairs, [2]string{"mounts (re-attached empty)", strings.Join(s.Mounts, ", ")})
	}
	if len(s.InUseBy) > 0 {
		pairs = append(pairs, [2]string{"in use by", strings.Join(s.InUseBy, ", ")})
	}
	return pairs
}

// newVMSnapshotCmd is `banger vm snapshot VM NAME [--stop] [--force]`.
func newVMSnapshotCmd(g *globals) *cobra.Command {
	var req api.SnapshotVMRequest
	cmd := &cobra.Command{
		Use:   "snapshot VM NAME",
		Short: "Save a running VM whole (memory, devices and disk) as snapshot NAME; it pauses only briefly",
		Args:  exactArgs(2, "a VM name and a snapshot name"),
		RunE: func(c *cobra.Command, args []string) error {
			req.Name = args[1]
			pr := newProgressRenderer(g.errOut)
			var res api.SnapshotVMResult
			err := g.client().Stream(c.Context(), "POST", "/vms/"+url.PathEscape(args[0])+"/snapshot", req, pr.Func(), &res)
			pr.Close()
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(g.out, res)
			}
			fmt.Fprintf(g.out, "snapshot %s of VM %s: %s on disk, VM paused %s; VM %s is %s\n", res.Snapshot.Name, args[0],
				humanBytes(res.Snapshot.SizeOnDisk), res.Snapshot.Pause.Round(time.Millisecond), res.VM.Name, res.VM.State)
			return nil
		},
	}
	cmd.Flags().BoolVar(&req.Stop, "stop", false, "stop the VM once it is saved")
	cmd.Flags().BoolVar(&req.Force, "force", false, "save a VM that has --mount folders (a restore re-attaches them empty)")
	return cmd
}

// newVMCloneCmd is `banger vm clone SNAPSHOT --name NEW`.
func newVMCloneCmd(g *globals) *cobra.Command {
	var req api.CloneRequest
	cmd := &cobra.Command{
		Use:   "clone SNAPSHOT --name NEW",
		Short: "Create VM NEW from a snapshot, with its own MAC, IP, hostname, machine-id and SSH host key; no boot",
		Args:  exactArgs(1, "a snapshot name"),
		RunE: func(c *cobra.Command, args []string) error {
			if req.Name == "" {
				return api.Errorf(api.CodeInvalid, "--name is required: the new VM's name")
			}
			pr := newProgressRenderer(g.errOut)
			var vm api.VM
			err := g.client().Stream(c.Context(), "POST", "/snapshots/"+url.PathEscape(args[0])+"/clone", req, pr.Func(), &vm)
			pr.Close()
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(g.out, vm)
			}
			fmt.Fprintf(g.out, "VM %s is %s (%s)\n", vm.Name, vm.State, vm.IP)
			return nil
		},
	}
	cmd.Flags().StringVar(&req.Name, "name", "", "the new VM's name (required)")
	cmd.Flags().BoolVar(&req.Wait, "wait", true, "wait until the clone is ready for banger ssh")
	return cmd
}
