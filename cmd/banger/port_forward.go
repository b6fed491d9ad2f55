package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/portfwd"
)

// portForwardDialTimeout bounds opening one forwarded connection through
// the daemon (the API upgrade and the guest's dial).
const portForwardDialTimeout = 30 * time.Second

func newPortForwardCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "port-forward VM [HOSTIP:]HOSTPORT:GUESTPORT...",
		Short: "Forward local ports to a VM's guest ports until Ctrl-C (as kubectl port-forward)",
		Long: "Listen on local ports, as you, and forward each connection to a guest port of a running VM\n" +
			"through the daemon and the guest agent's channel (the guest service may bind only its loopback;\n" +
			"no network is needed). It runs in the foreground until Ctrl-C (exit 0) and keeps no record:\n" +
			"for ports that open whenever the VM starts, use vm create -p.\n\n" +
			"A mapping is [HOSTIP:]HOSTPORT:GUESTPORT; HOSTIP defaults to 127.0.0.1, HOSTPORT 0 (or :GUESTPORT)\n" +
			"picks a free port and prints it, a single PORT means PORT:PORT. TCP only. Ports below 1024 need\n" +
			"root, as for any program. -o json prints the mappings as JSON.",
		Example: "  banger port-forward dev 8080:80\n  banger port-forward dev 0:5432 9229\n  banger port-forward dev 127.0.0.1:3000:3000",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) < 2 {
				return api.Errorf(api.CodeInvalid, "expected a VM name and at least one mapping: banger port-forward VM [HOSTIP:]HOSTPORT:GUESTPORT...")
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			return runPortForward(c.Context(), g, args[0], args[1:])
		},
	}
}

// parseForwards reads port-forward's mappings: kubectl's PORT (PORT:PORT)
// and :PORT (any free local port), else -p's [HOSTIP:]HOSTPORT:GUESTPORT,
// TCP only.
func parseForwards(values []string) ([]portfwd.Spec, error) {
	var specs []portfwd.Spec
	for _, v := range values {
		s := v
		if rest, ok := strings.CutSuffix(strings.ToLower(s), "/udp"); ok {
			return nil, api.Errorf(api.CodeInvalid, "%q: port-forward carries TCP only; publish a UDP port with vm create -p %s/udp", v, rest)
		}
		if !strings.Contains(s, ":") {
			port, _, _ := strings.Cut(s, "/")
			s = port + ":" + s
		}
		sp, err := portfwd.ParseSpecs(s)
		if err != nil {
			return nil, api.Errorf(api.CodeInvalid, "%v", err)
		}
		specs = append(specs, sp...)
	}
	if err := portfwd.CheckDistinct(specs); err != nil {
		return nil, api.Errorf(api.CodeInvalid, "%v", err)
	}
	return specs, nil
}

func runPortForward(ctx context.Context, g *globals, name string, mappings []string) error {
	specs, err := parseForwards(mappings)
	if err != nil {
		return err
	}
	client := g.client()
	var vm api.VM
	if err := client.Do(ctx, "GET", "/vms/"+url.PathEscape(name), nil, &vm); err != nil {
		return err
	}
	if vm.State != model.VMRunning {
		return api.Errorf(api.CodeConflict, "VM %q is %s: start it with banger vm start %s", vm.Name, vm.State, vm.Name)
	}
	// Bind every mapping as this user before forwarding any: all or none.
	var ls []*portfwd.Listener
	closeAll := func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}
	for _, sp := range specs {
		l, err := portfwd.Listen(sp, portfwd.Options{})
		if err != nil {
			closeAll()
			code := api.CodeInvalid
			switch {
			case errors.Is(err, portfwd.ErrPortInUse):
				code = api.CodeConflict
			case errors.Is(err, portfwd.ErrPermission):
				code = api.CodeForbidden
			}
			return api.Errorf(code, "port-forward %s: %v", strings.TrimSuffix(sp.String(), "/tcp"), err)
		}
		ls = append(ls, l)
	}
	defer closeAll()

	out := make([]api.PortForward, 0, len(ls))
	for _, l := range ls {
		sp := l.Spec()
		out = append(out, api.PortForward{VM: vm.Name, HostIP: sp.HostIP.String(), HostPort: sp.HostPort, GuestPort: sp.GuestPort, Proto: string(sp.Proto)})
	}
	if g.output == "json" {
		if err := printJSON(g.out, out); err != nil {
			return err
		}
	} else {
		for _, f := range out {
			fmt.Fprintln(g.out, "Forwarding from "+forwardString(f))
		}
	}

	// The forward ends at Ctrl-C (ctx), or when the VM goes away.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	path := "/vms/" + url.PathEscape(vm.Name) + "/port-forward"
	var wg sync.WaitGroup
	for _, l := range ls {
		sp := l.Spec()
		dial := func(ctx context.Context, _ portfwd.Proto, port uint16) (net.Conn, error) {
			fmt.Fprintf(g.errOut, "Handling connection for %d\n", sp.HostPort)
			dctx, dcancel := context.WithTimeout(ctx, portForwardDialTimeout)
			defer dcancel()
			conn, err := client.Upgrade(dctx, path, api.PortForwardRequest{Port: port})
			if err != nil {
				if ctx.Err() == nil {
					warnf(g, "banger: forwarding %s -> %s:%d: %v", sp.HostAddr(), vm.Name, port, err)
				}
				if api.CodeOf(err) == api.CodeNotFound {
					cancel(err)
				}
				return nil, err
			}
			return conn, nil
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := l.ServeDial(ctx, dial); err != nil {
				cancel(fmt.Errorf("port-forward %s: %w", sp.HostAddr(), err))
			}
		}()
	}
	<-ctx.Done()
	closeAll()
	wg.Wait()
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	// Ctrl-C (or SIGTERM): a clean end, as kubectl port-forward.
	return nil
}

// forwardString is "127.0.0.1:41234 -> dev:8080".
func forwardString(f api.PortForward) string {
	return net.JoinHostPort(f.HostIP, strconv.Itoa(int(f.HostPort))) + " -> " + f.VM + ":" + strconv.Itoa(int(f.GuestPort))
}
