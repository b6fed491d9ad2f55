package main

import (
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/sshkeys"
	"github.com/spf13/cobra"
)

// sshConfigSuffix ends the host names banger ssh-config defines.
const sshConfigSuffix = ".banger"

func newSSHConfigCmd(g *globals) *cobra.Command {
	var user string
	cmd := &cobra.Command{
		Use:   "ssh-config [VM...]",
		Short: "Print OpenSSH Host blocks that reach your VMs through their guest agents",
		Long: "Print an OpenSSH client configuration block for each VM (default: all of yours that have a host key),\n" +
			"as Host NAME.banger with ProxyCommand banger ssh --stdio %n, your banger key and the VM's pinned host\n" +
			"key. Add it to ~/.ssh/config (or Include a file holding it) and plain ssh, scp, sftp, rsync -e ssh,\n" +
			"VS Code Remote-SSH and Ansible reach the VM with no sshd in the image and no network.",
		Example: "  banger ssh-config >> ~/.ssh/config\n  ssh dev.banger\n  rsync -a ./src dev.banger:/srv/",
		RunE: func(c *cobra.Command, args []string) error {
			var vms []api.VM
			if len(args) == 0 {
				if err := g.client().Do(c.Context(), "GET", "/vms", nil, &vms); err != nil {
					return err
				}
			}
			for _, name := range args {
				var vm api.VM
				if err := g.client().Do(c.Context(), "GET", "/vms/"+url.PathEscape(name), nil, &vm); err != nil {
					return err
				}
				if vm.HostKey == "" {
					return api.Errorf(api.CodeConflict, "VM %q has no host key yet: start it (banger vm start %s) first", vm.Name, vm.Name)
				}
				vms = append(vms, vm)
			}
			kp, err := userKey()
			if err != nil {
				return err
			}
			proxy, err := proxyArgv(g, "%n")
			if err != nil {
				return err
			}
			pc, err := sshkeys.ProxyCommandLine(proxy)
			if err != nil {
				return err
			}
			var b strings.Builder
			for _, vm := range vms {
				if vm.HostKey == "" {
					continue
				}
				kh, err := pinHostKey(vm)
				if err != nil {
					return err
				}
				fmt.Fprintf(&b, "Host %s%s\n", vm.Name, sshConfigSuffix)
				fmt.Fprintf(&b, "  User %s\n", user)
				fmt.Fprintf(&b, "  ProxyCommand %s\n", pc)
				fmt.Fprintf(&b, "  IdentityFile %s\n", kp.PrivateKeyPath)
				fmt.Fprintf(&b, "  IdentitiesOnly yes\n")
				fmt.Fprintf(&b, "  UserKnownHostsFile %s\n", kh)
				fmt.Fprintf(&b, "  HostKeyAlias %s\n", vm.Name)
				fmt.Fprintf(&b, "  StrictHostKeyChecking yes\n")
				fmt.Fprintf(&b, "  CheckHostIP no\n")
				fmt.Fprintf(&b, "  UpdateHostKeys no\n\n")
			}
			_, err = fmt.Fprint(g.out, b.String())
			return err
		},
	}
	cmd.Flags().StringVarP(&user, "user", "l", "root", "user the blocks log in as")
	return cmd
}

// proxyArgv is the command ssh runs to reach VM host (a name or "%n"):
// this banger, on this daemon socket, with ssh --stdio.
func proxyArgv(g *globals, host string) ([]string, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find the banger executable for ProxyCommand: %w", err)
	}
	argv := []string{self}
	if g.socket != "" || os.Getenv("BANGER_SOCKET") != "" {
		argv = append(argv, "--socket", g.socketPath())
	}
	return append(argv, "ssh", "--stdio", host), nil
}

// agentSSHArgv is the ssh command line that reaches vm through its agent.
func agentSSHArgv(g *globals, vm api.VM, user, key, knownHosts string, command []string) ([]string, error) {
	proxy, err := proxyArgv(g, vm.Name)
	if err != nil {
		return nil, err
	}
	return sshkeys.Command(sshkeys.SSHOptions{User: user, KeyPath: key, KnownHostsPath: knownHosts, Alias: vm.Name, Command: command, Proxy: proxy})
}
