package main

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/daemon"
	"github.com/spf13/cobra"
)

func newDaemonCmd(g *globals) *cobra.Command {
	var (
		cfgFile                        string
		stateDir, cacheDir, runtimeDir string
		logLevel, logFormat            string
	)
	cmd := &cobra.Command{
		Use:   "daemon",
		Short: "Run the banger daemon in the foreground (as root)",
		Long: "Run the banger daemon in the foreground. It must run as root: it owns taps, loop devices,\n" +
			"device-mapper devices and VM disks. It logs to stderr (journald under systemd) and stops on SIGTERM or SIGINT.\n" +
			"--socket sets the socket it listens on (default <runtime-dir>/banger.sock).",
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return api.Errorf(api.CodeInvalid, "--log-level %q: use debug, info, warn or error", logLevel)
			}
			hopts := &slog.HandlerOptions{Level: lvl}
			var h slog.Handler = slog.NewTextHandler(os.Stderr, hopts)
			if logFormat == "json" {
				h = slog.NewJSONHandler(os.Stderr, hopts)
			}
			log := slog.New(h)
			slog.SetDefault(log)

			home, _ := os.UserHomeDir()
			cfg := config.ForCurrentProcess()
			required := cfgFile != ""
			if cfgFile == "" {
				cfgFile = config.DefaultFile(os.Geteuid(), home)
			}
			if err := config.Load(&cfg, cfgFile, required); err != nil {
				return api.Errorf(api.CodeInvalid, "%v", err)
			}
			if stateDir != "" {
				cfg.StateDir = stateDir
			}
			if cacheDir != "" {
				cfg.CacheDir = cacheDir
			}
			sock := g.socket
			if runtimeDir != "" {
				cfg.RuntimeDir = runtimeDir
				if sock == "" && !strings.HasPrefix(cfg.Socket, runtimeDir) {
					cfg.Socket = runtimeDir + "/banger.sock"
				}
			}
			if sock != "" {
				cfg.Socket = sock
			}
			if os.Geteuid() != 0 {
				log.Warn("the banger daemon is not running as root: VM networking and disks will fail; run it with sudo")
			}
			d, err := daemon.New(cmd.Context(), daemon.Options{Config: cfg, Logger: log})
			if err != nil {
				return err
			}
			ln, err := d.Listen()
			if err != nil {
				return fmt.Errorf("%w", err)
			}
			return d.Serve(cmd.Context(), ln)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfgFile, "config", "", "config file (default /etc/banger/config.json as root, ~/.config/banger/config.json otherwise)")
	f.StringVar(&stateDir, "state-dir", "", "state directory (default /var/lib/banger as root)")
	f.StringVar(&cacheDir, "cache-dir", "", "cache directory (default /var/cache/banger as root)")
	f.StringVar(&runtimeDir, "runtime-dir", "", "runtime directory (default /run/banger as root)")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	return cmd
}
