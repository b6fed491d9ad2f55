package main

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/sshkeys"
	"github.com/spf13/cobra"
)

func newSSHCmd(g *globals) *cobra.Command {
	var user string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "ssh NAME [-- COMMAND...]",
		Short: "Open a shell in a VM, or run a command in it and return its exit status",
		Long: "Connect to a VM with ssh, using your banger key and the VM's pinned host key\n" +
			"(reported by its guest agent; no blanket StrictHostKeyChecking=no). Waits for a starting VM to be ready.",
		Example: "  banger ssh dev\n  banger ssh dev -- uname -r",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) < 1 {
				return api.Errorf(api.CodeInvalid, "expected a VM name")
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			name, command := args[0], args[1:]
			vm, err := waitForSSH(g, c, name, timeout)
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
			dir, err := userSSHDir()
			if err != nil {
				return err
			}
			kh := filepath.Join(dir, "known_hosts-"+vm.ID)
			if err := sshkeys.WriteKnownHosts(kh, vm.Name, vm.HostKey); err != nil {
				return fmt.Errorf("pin the host key of VM %q: %w", vm.Name, err)
			}
			argv, err := sshkeys.Command(sshkeys.SSHOptions{User: user, IP: vm.IP, KeyPath: kp.PrivateKeyPath, KnownHostsPath: kh, Alias: vm.Name, Command: command})
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
	cmd.Flags().DurationVar(&timeout, "wait", 10*time.Minute, "how long to wait for a starting VM")
	return cmd
}

// waitForSSH returns the VM once it is running with a known host key,
// printing a progress line while it boots.
func waitForSSH(g *globals, c *cobra.Command, name string, timeout time.Duration) (api.VM, error) {
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
			if vm.HostKey != "" && vm.IP != "" {
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
