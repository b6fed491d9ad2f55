package imagepull

import (
	"slices"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/guestinit/selection"
)

// runConfig is the part of an OCI config banger honours: Entrypoint, Cmd,
// Env, WorkingDir, User and ExposedPorts (sorted).
func runConfig(cf *v1.ConfigFile) guestabi.ImageConfig {
	if cf == nil {
		return guestabi.ImageConfig{}
	}
	c := cf.Config
	out := guestabi.ImageConfig{
		Entrypoint: slices.Clone(c.Entrypoint),
		Cmd:        slices.Clone(c.Cmd),
		Env:        slices.Clone(c.Env),
		WorkingDir: c.WorkingDir,
		User:       c.User,
	}
	for p := range c.ExposedPorts {
		out.ExposedPorts = append(out.ExposedPorts, p)
	}
	slices.Sort(out.ExposedPorts)
	return out
}

// GuestFacts is what an unpacked image says about how its VMs will boot.
type GuestFacts struct {
	// Init is the init VMs get with --init auto, and Reason why.
	Init   guestabi.Init
	Reason string
	// Shell: /bin/sh resolves inside the image.
	Shell bool
	// SSHD: the image has an sshd.
	SSHD bool
	// SSHDReady: the image's init is systemd and its sshd is enabled and
	// has an ed25519 host key, so first boot has nothing to do.
	SSHDReady bool
}

// InspectGuest applies banger's boot rules to the unpacked image at root
// (the Flatten directory), before banger's own files are added to it.
func InspectGuest(root string) GuestFacts {
	var f GuestFacts
	systemd, why := selection.IsSystemd(root)
	f.Reason = why
	if systemd {
		f.Init = guestabi.InitImage
	} else {
		f.Init = guestabi.InitBanger
	}
	f.Shell = selection.Executable(root, "/bin/sh")
	for _, p := range []string{"/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"} {
		if selection.Executable(root, p) {
			f.SSHD = true
		}
	}
	if f.SSHD && f.Init == guestabi.InitImage {
		_, keyErr := selection.Resolve(root, strings.TrimSuffix(guestabi.HostKey, ".pub"))
		enabled := false
		for _, u := range []string{"ssh.service", "sshd.service"} {
			if _, err := selection.Resolve(root, "/etc/systemd/system/multi-user.target.wants/"+u); err == nil {
				enabled = true
			}
		}
		f.SSHDReady = keyErr == nil && enabled
	}
	return f
}

// Notes are the lines a pull prints about the image's boot.
func (f GuestFacts) Notes() []string {
	var notes []string
	if f.Init == guestabi.InitImage {
		notes = append(notes, "VMs boot the image's own init (systemd): "+f.Reason)
	} else {
		notes = append(notes, "VMs boot banger's init (the image has no systemd: "+f.Reason+")")
	}
	if !f.Shell {
		notes = append(notes, "the image has no shell (/bin/sh): banger ssh will need the agent's SSH server")
	} else if !f.SSHD && f.Init == guestabi.InitBanger {
		notes = append(notes, "the image has no sshd: first boot installs one when the image has a package manager and the VM a route out")
	}
	return notes
}
