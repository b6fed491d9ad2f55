package main

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/sshkeys"
	"github.com/spf13/cobra"
)

func newSSHCmd(g *globals) *cobra.Command {
	var user, via string
	var timeout time.Duration
	var stdio bool
	cmd := &cobra.Command{
		Use:   "ssh NAME [-- COMMAND...]",
		Short: "Open a shell in a VM, or run a command in it and return its exit status",
		Long: "Connect to a VM with ssh, using your banger key and the VM's pinned host key\n" +
			"(reported by its guest agent; no blanket StrictHostKeyChecking=no). Waits for a starting VM to be ready.\n" +
			"With --via agent, ssh goes through the guest agent's channel to the SSH server the agent runs itself:\n" +
			"no sshd in the image and no route to the VM are needed. The default (auto) uses the image's sshd\n" +
			"over the network when it answers, and the agent otherwise. --stdio relays one SSH connection over\n" +
			"standard input and output, for ssh's ProxyCommand (see banger ssh-config).",
		Example: "  banger ssh dev\n  banger ssh dev -- uname -r\n  banger ssh --via agent dev",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) < 1 {
				return api.Errorf(api.CodeInvalid, "expected a VM name")
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			name, command := args[0], args[1:]
			if stdio {
				return sshStdio(c, g, strings.TrimSuffix(name, sshConfigSuffix))
			}
			switch via {
			case "auto", "agent", "network":
			default:
				return api.Errorf(api.CodeInvalid, "--via %q: use auto, agent or network", via)
			}
			vm, err := waitForSSH(g, c, name, timeout, via != "network")
			if err != nil {
				return err
			}
			kp, err := userKey()
			if err != nil {
				return err
			}
			if vm.SSHKey != "" && vm.SSHKey != kp.AuthorizedKey {
				return api.Errorf(api.CodeForbidden, "VM %q authorizes another ssh key than yours (%s): restart it with banger vm restart %s to authorize yours", vm.Name, kp.PublicKeyPath, vm.Name)
			}
			kh, err := pinHostKey(vm)
			if err != nil {
				return err
			}
			useAgent := via == "agent" || (via == "auto" && !sshdAnswers(vm.IP))
			var argv []string
			if useAgent {
				argv, err = agentSSHArgv(g, vm, user, kp.PrivateKeyPath, kh, command)
			} else {
				if vm.IP == "" {
					return api.Errorf(api.CodeConflict, "VM %q has no network address: use banger ssh --via agent %s", vm.Name, vm.Name)
				}
				argv, err = sshkeys.Command(sshkeys.SSHOptions{User: user, IP: vm.IP, KeyPath: kp.PrivateKeyPath, KnownHostsPath: kh, Alias: vm.Name, Command: command})
			}
			if err != nil {
				return err
			}
			bin, err := exec.LookPath(argv[0])
			if err != nil {
				return api.Errorf(api.CodeInvalid, "ssh is not installed: apt-get install openssh-client")
			}
			ssh := exec.CommandContext(c.Context(), bin, argv[1:]...)
			ssh.Stdin, ssh.Stdout, ssh.Stderr = os.Stdin, g.out, g.errOut
			if err := ssh.Run(); err != nil {
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					return exitError{code: ee.ExitCode()}
				}
				return fmt.Errorf("run ssh: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&user, "user", "l", "root", "user to log in as")
	cmd.Flags().StringVar(&via, "via", "auto", "how to reach the VM: auto, agent (the guest agent's channel) or network (the image's sshd)")
	cmd.Flags().BoolVar(&stdio, "stdio", false, "relay one SSH connection to the VM's agent over standard input and output (for ProxyCommand)")
	cmd.Flags().DurationVar(&timeout, "wait", 10*time.Minute, "how long to wait for a starting VM")
	return cmd
}

// pinHostKey writes the VM's known_hosts file and returns its path.
func pinHostKey(vm api.VM) (string, error) {
	dir, err := userSSHDir()
	if err != nil {
		return "", err
	}
	kh := filepath.Join(dir, "known_hosts-"+vm.ID)
	if err := sshkeys.WriteKnownHosts(kh, vm.Name, vm.HostKey); err != nil {
		return "", fmt.Errorf("pin the host key of VM %q: %w", vm.Name, err)
	}
	return kh, nil
}

// sshdAnswers reports whether the VM's own sshd accepts connections.
func sshdAnswers(ip string) bool {
	if ip == "" {
		return false
	}
	c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, "22"), 500*time.Millisecond)
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

// sshStdio relays one SSH connection between standard input/output and
// the SSH server of the VM's agent.
func sshStdio(c *cobra.Command, g *globals, name string) error {
	conn, err := g.client().Upgrade(c.Context(), "/vms/"+url.PathEscape(name)+"/ssh", struct{}{})
	if err != nil {
		return err
	}
	return copyStdio(conn)
}

// waitForSSH returns the VM once it is running with a known host key,
// printing a progress line while it boots.
func waitForSSH(g *globals, c *cobra.Command, name string, timeout time.Duration, agentOK bool) (api.VM, error) {
	deadline := time.Now().Add(timeout)
	pr := newProgressRenderer(g.errOut)
	defer pr.Close()
	start := time.Now()
	for {
		var vm api.VM
		if err := g.client().Do(c.Context(), "GET", "/vms/"+url.PathEscape(name), nil, &vm); err != nil {
			return vm, err
		}
		switch vm.State {
		case model.VMRunning:
			if vm.HostKey != "" && (vm.IP != "" || agentOK) {
				return vm, nil
			}
			if vm.FirstBoot == "failed" {
				return vm, api.Errorf(api.CodeConflict, "VM %q is running but its first boot failed to install sshd: %s (banger vm inspect %s shows the log)", name, vm.Reason, name)
			}
		case model.VMStarting:
		case model.VMError:
			return vm, api.Errorf(api.CodeConflict, "VM %q is in error: %s", name, vm.Reason)
		default:
			return vm, api.Errorf(api.CodeConflict, "VM %q is %s: start it with banger vm start %s", name, vm.State, name)
		}
		if time.Now().After(deadline) {
			return vm, api.Errorf(api.CodeConflict, "VM %q was not ready for ssh after %s", name, timeout)
		}
		msg := "waiting for the guest"
		if vm.FirstBoot != "" {
			msg = "first boot " + vm.FirstBoot
		}
		pr.Func().Report(progressEvent("ssh", name, fmt.Sprintf("%s (%s)", msg, time.Since(start).Round(time.Second))))
		select {
		case <-c.Context().Done():
			return vm, api.Errorf(api.CodeCanceled, "canceled")
		case <-time.After(time.Second):
		}
	}
}
