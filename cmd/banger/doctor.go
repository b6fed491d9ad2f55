package main

import (
	"os"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/doctor"
	"github.com/spf13/cobra"
)

func newDoctorCmd(g *globals) *cobra.Command {
	var stateDir, cacheDir string
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check this host's prerequisites for banger",
		Long:  "Check this host's prerequisites for banger and say how to fix what is missing.\nExits 1 when a required check fails.",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := config.ForCurrentProcess()
			if os.Geteuid() != 0 {
				// The daemon runs as root: check the paths it uses.
				cfg = config.Defaults(0, "", "")
			}
			var dv api.VersionInfo
			daemonErr := g.client().Do(cmd.Context(), "GET", "/version", nil, &dv)
			if daemonErr == nil {
				cfg.StateDir, cfg.CacheDir = dv.StateDir, dv.CacheDir
			}
			if stateDir != "" {
				cfg.StateDir = stateDir
			}
			if cacheDir != "" {
				cfg.CacheDir = cacheDir
			}
			checks := doctor.Run(cmd.Context(), doctor.DefaultHost(), cfg.StateDir, cfg.CacheDir)
			dc := doctor.Check{Name: "daemon", Status: doctor.OK}
			if daemonErr != nil {
				dc.Status, dc.Detail, dc.Fix = doctor.Warn, "not reachable at "+g.socketPath(), "sudo systemctl start banger (or sudo banger daemon)"
			} else {
				dc.Detail = "running, pid " + itoa(dv.PID) + ", version " + dv.Version
			}
			checks = append(checks, dc)
			if g.output == "json" {
				if err := printJSON(g.out, checks); err != nil {
					return err
				}
			} else {
				rows := make([][]string, 0, len(checks))
				for _, c := range checks {
					st := string(c.Status)
					if c.Required && c.Status == doctor.Fail {
						st = "FAIL"
					}
					rows = append(rows, []string{c.Name, st, c.Detail, c.Fix})
				}
				if err := printTable(g.out, []string{"CHECK", "STATUS", "DETAIL", "FIX"}, rows); err != nil {
					return err
				}
			}
			if doctor.Failed(checks) {
				return exitError{code: exitInternal}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&stateDir, "state-dir", "", "state directory to check for free space")
	cmd.Flags().StringVar(&cacheDir, "cache-dir", "", "cache directory to check for free space")
	return cmd
}
