package main

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/bangerdev/banger/internal/api"
)

// addPortFlags adds vm create's -p/--publish.
func addPortFlags(f *pflag.FlagSet, req *api.CreateVMRequest) {
	f.StringArrayVarP(&req.Ports, "publish", "p", nil,
		"publish a guest port on the host, [HOSTIP:][HOSTPORT:]GUESTPORT[/tcp|/udp] (HOSTIP defaults to 127.0.0.1, HOSTPORT 0 or absent picks a free port; repeatable)")
}

// addMountFlags adds vm create's --mount.
func addMountFlags(f *pflag.FlagSet, mounts *[]string) {
	f.StringArrayVar(mounts, "mount", nil, "mount a host folder in the guest, HOSTDIR:GUESTDIR[:ro] (checked as you; files the guest makes are yours; repeatable)")
}

// absMounts makes each --mount's HOSTDIR absolute against the working
// directory (the daemon takes only absolute paths).
func absMounts(values []string) ([]string, error) {
	out := make([]string, 0, len(values))
	for _, v := range values {
		host, rest, ok := strings.Cut(v, ":")
		if !ok || host == "" {
			return nil, api.Errorf(api.CodeInvalid, "--mount %q: want HOSTDIR:GUESTDIR[:ro]", v)
		}
		abs, err := filepath.Abs(host)
		if err != nil {
			return nil, api.Errorf(api.CodeInvalid, "--mount %q: %v", v, err)
		}
		out = append(out, abs+":"+rest)
	}
	return out, nil
}

// portString is "8080/tcp -> 127.0.0.1:41234", as docker port prints it.
func portString(p api.Port) string {
	return fmt.Sprintf("%d/%s -> %s", p.GuestPort, p.Proto, net.JoinHostPort(p.HostIP, strconv.Itoa(int(p.HostPort))))
}

// portPairs are vm inspect's lines for the published ports.
func portPairs(v api.VM) [][2]string {
	var pairs [][2]string
	for _, p := range v.Ports {
		pairs = append(pairs, [2]string{"port", portString(p)})
	}
	for _, m := range v.Mounts {
		pairs = append(pairs, [2]string{"mount", m})
	}
	return pairs
}

// newPortCmd is "banger port VM [GUESTPORT[/PROTO]]": the published ports
// of a VM and the host addresses they are on.
func newPortCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "port VM [GUESTPORT[/PROTO]]",
		Short:   "List a VM's published ports (vm create -p) and their host addresses",
		Example: "  banger port dev\n  banger port dev 8080\n  curl http://$(banger port dev 8080)/",
		Args:    cobra.RangeArgs(1, 2),
		RunE: func(c *cobra.Command, args []string) error {
			var v api.VM
			if err := g.client().Do(c.Context(), "GET", "/vms/"+url.PathEscape(args[0]), nil, &v); err != nil {
				return err
			}
			ports := v.Ports
			if len(args) == 2 {
				want, proto, _ := strings.Cut(args[1], "/")
				if proto == "" {
					proto = "tcp"
				}
				n, err := strconv.ParseUint(want, 10, 16)
				if err != nil {
					return api.Errorf(api.CodeInvalid, "%q is not a guest port", args[1])
				}
				ports = nil
				for _, p := range v.Ports {
					if uint64(p.GuestPort) == n && p.Proto == proto {
						ports = append(ports, p)
					}
				}
				if len(ports) == 0 {
					return api.Errorf(api.CodeNotFound, "VM %s publishes no %d/%s (banger port %s lists its ports)", v.Name, n, proto, v.Name)
				}
				if g.output != "json" {
					for _, p := range ports {
						fmt.Fprintln(g.out, net.JoinHostPort(p.HostIP, strconv.Itoa(int(p.HostPort))))
					}
					return nil
				}
			}
			if g.output == "json" {
				if ports == nil {
					ports = []api.Port{}
				}
				return printJSON(g.out, ports)
			}
			for _, p := range ports {
				fmt.Fprintln(g.out, portString(p))
			}
			return nil
		},
	}
}
