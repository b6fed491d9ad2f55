package main

import (
	"runtime"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/daemon"
	"github.com/spf13/cobra"
)

func newVersionCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the CLI's and the daemon's versions",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			type out struct {
				Client api.VersionInfo  `json:"client"`
				Daemon *api.VersionInfo `json:"daemon,omitempty"`
				Error  string           `json:"daemon_error,omitempty"`
			}
			o := out{Client: api.VersionInfo{Version: daemon.Version, GoVersion: runtime.Version()}}
			var dv api.VersionInfo
			if err := g.client().Do(cmd.Context(), "GET", "/version", nil, &dv); err != nil {
				o.Error = err.Error()
			} else {
				o.Daemon = &dv
			}
			if g.output == "json" {
				return printJSON(g.out, o)
			}
			pairs := [][2]string{{"client", o.Client.Version + " (" + o.Client.GoVersion + ")"}}
			if o.Daemon != nil {
				pairs = append(pairs, [2]string{"daemon", dv.Version + " (pid " + itoa(dv.PID) + ", schema " + itoa(dv.SchemaVersion) + ", state " + dv.StateDir + ")"})
			} else {
				pairs = append(pairs, [2]string{"daemon", "unreachable: " + o.Error})
			}
			return printKV(g.out, pairs)
		},
	}
}
