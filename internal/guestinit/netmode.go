package guestinit

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/bangerdev/banger/internal/guestabi"
)

// RunNetwork is the guest program's network mode (banger-vsock-agent
// network), which banger-network.service runs in systemd images: it
// applies the kernel command line's network keys (guestabi.Cmdline) with
// the same netlink code as banger's PID 1, and returns the exit status.
func RunNetwork(args []string) int {
	fs := flag.NewFlagSet("banger-vsock-agent network", flag.ContinueOnError)
	wait := fs.Duration("wait", 30*time.Second, "how long to wait for the network interface to appear")
	cmdline := fs.String("cmdline", "/proc/cmdline", "file holding the kernel command line")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	fail := func(what string, err error) int {
		fmt.Fprintf(os.Stderr, "banger-network: %s: %v\n", what, oneLine(err.Error()))
		return 1
	}
	b, err := os.ReadFile(*cmdline)
	if err != nil {
		return fail("read the kernel command line", err)
	}
	c, err := guestabi.Parse(string(b))
	if err != nil {
		return fail("parse the kernel command line", err)
	}
	if !c.Network.Configured() {
		fmt.Fprintln(os.Stderr, "banger-network: no "+guestabi.KeyIP+"= on the kernel command line: nothing to do")
		return 0
	}
	if err := upLoopback(); err != nil {
		return fail("network", err)
	}
	// The names first, as banger's PID 1 does: once the address shows, the
	// hostname and /etc/hosts are already the VM's (the agent reports
	// both, and a second vCPU runs it alongside).
	var dns []string
	for _, a := range c.Network.DNS {
		dns = append(dns, a.String())
	}
	namesErr := writeNameFiles("/", c.Hostname, dns)
	if namesErr != nil {
		fail("names", namesErr)
	}
	iface, err := configureNetwork(c.Network, *wait)
	if err != nil {
		return fail("network", err)
	}
	if namesErr != nil {
		return 1
	}
	fmt.Fprintf(os.Stderr, "banger-network: done: %s on %s via %s\n", c.Network.Address, iface, c.Network.Gateway)
	return 0
}
