package main

import (
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/spf13/cobra"
)

func newVMCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "vm",
		Aliases: []string{"vms"},
		Short:   "Manage VMs",
	}
	cmd.AddCommand(
		&cobra.Command{
			Use:   "ls",
			Short: "List VMs (yours; root sees all)",
			Args:  exactArgs(0, "no arguments"),
			RunE: func(c *cobra.Command, _ []string) error {
				var vms []api.VMSummary
				if err := g.client().Do(c.Context(), "GET", "/vms", nil, &vms); err != nil {
					return err
				}
				if g.output == "json" {
					return printJSON(g.out, vms)
				}
				rows := make([][]string, 0, len(vms))
				for _, v := range vms {
					rows = append(rows, []string{v.Name, string(v.State), orDash(v.IP), orDash(v.VMM), orDash(v.DiskDriver), v.Image, ownerName(v.OwnerUID),
						uptime(v.State, v.StartedAt)})
				}
				return printTable(g.out, []string{"NAME", "STATE", "IP", "VMM", "DISK", "IMAGE", "OWNER", "UPTIME"}, rows)
			},
		},
		&cobra.Command{
			Use:   "inspect NAME",
			Short: "Show a VM's record, runtime and recovery details",
			Args:  exactArgs(1, "a VM name"),
			RunE: func(c *cobra.Command, args []string) error {
				var v api.VM
				if err := g.client().Do(c.Context(), "GET", "/vms/"+url.PathEscape(args[0]), nil, &v); err != nil {
					return err
				}
				if g.output == "json" {
					return printJSON(g.out, v)
				}
				return printKV(g.out, vmPairs(v))
			},
		},
		newVMCreateCmd(g, "create", "Create a VM from an image (its disk is made now; start it with banger vm start)", false),
		newVMCreateCmd(g, "run", "Create a VM, start it and wait until it is ready for banger ssh", true),
		newVMStartCmd(g),
		newVMStopCmd(g),
		newVMRestartCmd(g),
		newVMRmCmd(g),
		newVMLogsCmd(g),
		newVMSnapshotCmd(g), // snapshot.go
		newVMCloneCmd(g),
	)
	return cmd
}

func vmPairs(v api.VM) [][2]string {
	pairs := [][2]string{
		{"name", v.Name}, {"id", v.ID}, {"state", string(v.State)}, {"reason", v.Reason},
		{"owner", ownerName(v.OwnerUID)}, {"image", v.Image}, {"kernel", v.Kernel},
		{"vmm", v.VMM}, {"disk driver", v.DiskDriver},
		{"cpus", strconv.Itoa(v.CPUs)}, {"memory", strconv.Itoa(v.MemoryMiB) + " MiB"}, {"disk", humanBytes(v.DiskBytes)},
		{"ip", v.IP}, {"mac", v.MAC}, {"uptime", uptime(v.State, v.StartedAt)}, {"first boot", v.FirstBoot},
		{"created", v.Created.Format(time.RFC3339)},
	}
	pairs = append(pairs, guestPairs(v)...)
	pairs = append(pairs, portPairs(v)...)
	// The runtime and recovery details are root's only.
	if rt := v.Runtime; rt != nil {
		if rt.Monitor.PID != 0 {
			pairs = append(pairs, [2]string{"pid", strconv.Itoa(rt.Monitor.PID)})
		}
		pairs = append(pairs, [][2]string{{"tap", rt.Tap.Name}, {"dm device", rt.Disk.DMName}, {"disk path", rt.Disk.Path}, {"console log", rt.ConsoleLog}}...)
		for _, l := range rt.Disk.Loops {
			pairs = append(pairs, [2]string{"loop", l.Device + " -> " + l.BackingFile})
		}
	}
	if rec := v.Recovery; rec != nil {
		if !rec.ReadoptedAt.IsZero() {
			pairs = append(pairs, [2]string{"re-adopted at", rec.ReadoptedAt.Format(time.RFC3339)})
		}
		if !rec.CleanedAt.IsZero() {
			pairs = append(pairs, [2]string{"last cleanup", rec.CleanedAt.Format(time.RFC3339) + " removed: " + orDash(strings.Join(rec.Removed, ", "))})
		}
	}
	return pairs
}

func uptime(st model.VMState, startedAt time.Time) string {
	if st != model.VMRunning || startedAt.IsZero() {
		return "-"
	}
	return humanDuration(time.Since(startedAt))
}
