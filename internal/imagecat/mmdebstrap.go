package imagecat

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
)

// DebianPackages is what a catalog Debian image has on top of mmdebstrap's
// minbase variant: systemd as PID 1, sshd (so no first-boot install is
// needed), sudo, iproute2, udev and kmod.
var DebianPackages = []string{"systemd", "systemd-sysv", "openssh-server", "sudo", "iproute2", "udev", "kmod"}

var (
	suiteRE   = regexp.MustCompile(`^[a-z][a-z0-9-]{0,31}$`)
	packageRE = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]{0,127}$`)
	mirrorRE  = regexp.MustCompile(`^(https?|file)://[^\s'"\\]+$`)
)

// Mmdebstrap builds a Debian root filesystem tar at out with
// `mmdebstrap --variant=minbase --include=PKGS --format=tar SUITE OUT
// MIRROR` (run as root: the tar keeps real owners, modes and xattrs).
// Its output goes to log.
func Mmdebstrap(ctx context.Context, suite, mirror string, packages []string, out string, log io.Writer) error {
	if !suiteRE.MatchString(suite) {
		return fmt.Errorf("mmdebstrap: suite %q", suite)
	}
	if !mirrorRE.MatchString(mirror) {
		return fmt.Errorf("mmdebstrap: mirror %q is not an http(s):// or file:// URL", mirror)
	}
	for _, p := range packages {
		if !packageRE.MatchString(p) {
			return fmt.Errorf("mmdebstrap: package name %q", p)
		}
	}
	args := []string{"--variant=minbase", "--format=tar"}
	if len(packages) > 0 {
		args = append(args, "--include="+strings.Join(packages, ","))
	}
	args = append(args, "--", suite, out, mirror)
	cmd := exec.CommandContext(ctx, "mmdebstrap", args...) // #nosec G204 -- fixed program; every argument is validated above
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Run(); err != nil {
		_ = os.Remove(out)
		return fmt.Errorf("mmdebstrap %s: %w", suite, err)
	}
	return nil
}

// HostMirror returns the first Debian archive URL the host's apt sources
// name (not the security archive), else deb.debian.org.
func HostMirror() string {
	for _, f := range []string{"/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"} {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			var cands []string
			if rest, ok := strings.CutPrefix(line, "URIs:"); ok {
				cands = strings.Fields(rest)
			} else if strings.HasPrefix(line, "deb ") {
				cands = strings.Fields(line)[1:]
			}
			for _, c := range cands {
				if mirrorRE.MatchString(c) && strings.HasPrefix(c, "http") && !strings.Contains(c, "security") {
					_ = fh.Close()
					return c
				}
			}
		}
		_ = fh.Close()
	}
	return "http://deb.debian.org/debian"
}
