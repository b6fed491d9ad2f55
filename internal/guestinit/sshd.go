package guestinit

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/guestabi"
)

var sshdPaths = []string{"/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"}

// findSSHD returns the image's sshd, or "".
func findSSHD() string {
	for _, p := range sshdPaths {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
			return p
		}
	}
	return ""
}

// packageManagers are the installers first-boot.sh knows.
var packageManagers = []string{"apt-get", "apk", "dnf", "yum", "pacman", "zypper"}

// firstBootAndSSHD runs first boot when it is still pending after
// firstBootEarly and can work (a package manager and a route out), else
// records why it is skipped; then starts the image's sshd, if it has one,
// with host keys.
func (p *pid1) firstBootAndSSHD() {
	if p.firstBootPending {
		state, why := p.firstBoot()
		p.recordFirstBoot(state, why)
	}
	if p.sshdPath == "" {
		p.sshdPath = findSSHD()
	}
	if p.sshdPath == "" {
		p.logf("no sshd in the image: banger ssh needs the agent's SSH server")
		return
	}
	if err := ensureHostKeys(p); err != nil {
		p.failf("sshd host keys", err)
	}
	_ = os.MkdirAll("/run/sshd", 0o755)
	p.supervise("sshd", func() (int, <-chan unix.WaitStatus, error) {
		return p.procs.start(p.sshdPath, []string{p.sshdPath, "-D", "-e"}, &syscall.ProcAttr{
			Dir: "/", Env: []string{"PATH=" + defaultPath}, Files: []uintptr{devNull(), 1, 2},
			Sys: &syscall.SysProcAttr{Setsid: true},
		})
	})
}

// firstBootEarly settles first boot at once, before the network is up,
// when its outcome does not depend on the network: sshd already there, no
// package manager to install it with, or no route out (no gateway, or the
// host said it has none: banger.noegress). It leaves p.firstBootPending set
// when the install must be tried.
func (p *pid1) firstBootEarly() {
	if _, err := os.Lstat(guestabi.FirstBootMarker); err != nil {
		return
	}
	switch {
	case p.sshdPath != "":
		p.recordFirstBoot(guestabi.FirstBootDone, "sshd is already installed")
	case p.packageManager() == "":
		p.recordFirstBoot(guestabi.FirstBootSkipped, "the image has no package manager to install sshd with")
	case !p.cmdline.Network.Gateway.IsValid() || p.cmdline.NoEgress:
		// No route out, known from the command line: no need to wait for
		// the network to find that out.
		state, why := p.firstBoot()
		p.recordFirstBoot(state, why)
	default:
		p.firstBootPending = true
	}
}

// recordFirstBoot writes the first-boot state, and its reason to the log;
// the marker goes unless the attempt failed (it is retried next boot).
func (p *pid1) recordFirstBoot(state guestabi.FirstBootState, why string) {
	p.logf("first boot %s: %s", state, why)
	appendFirstBootLog("banger-first-boot: " + string(state) + ": " + why)
	if state != guestabi.FirstBootFailed {
		_ = os.Remove(guestabi.FirstBootMarker)
	}
	if err := writeFileAtomic(guestabi.FirstBootStatus, []byte(string(state)+"\n"), 0o644); err != nil {
		p.failf("record first boot", err)
	}
}

// packageManager is the first installer first-boot.sh knows found in the
// image, or "".
func (p *pid1) packageManager() string {
	for _, name := range packageManagers {
		if path, err := lookPath("/", name, nil); err == nil {
			return path
		}
	}
	return ""
}

// firstBoot tries the sshd install: with a route out, through the image's
// package manager (first-boot.sh).
func (p *pid1) firstBoot() (guestabi.FirstBootState, string) {
	pm := p.packageManager()
	if p.cmdline.NoEgress {
		return guestabi.FirstBootSkipped, "the host has no route out (" + guestabi.KeyNoEgress + ") to install sshd through"
	}
	if !p.haveNet {
		return guestabi.FirstBootSkipped, "the VM has no route out (no network or gateway) to install sshd"
	}
	if _, err := os.Stat("/bin/sh"); err != nil {
		return guestabi.FirstBootSkipped, "the image has no /bin/sh to run " + guestabi.FirstBootScript
	}
	if filepath.Base(pm) == "apt-get" {
		if err := reachMirror(aptMirrors("/"), 3*time.Second); err != nil {
			return guestabi.FirstBootSkipped, "no route out to the package mirror (" + oneLineErr(err) + ")"
		}
	}
	_, done, err := p.procs.start("/bin/sh", []string{"sh", guestabi.FirstBootScript}, &syscall.ProcAttr{
		Dir: "/", Env: []string{"PATH=" + defaultPath, "BANGER_INIT=banger"}, Files: []uintptr{devNull(), 1, 2},
		Sys: &syscall.SysProcAttr{Setsid: true},
	})
	if err != nil {
		return guestabi.FirstBootFailed, err.Error()
	}
	ws := <-done
	p.sshdPath = findSSHD()
	if !ws.Exited() || ws.ExitStatus() != 0 || p.sshdPath == "" {
		return guestabi.FirstBootFailed, "installing sshd failed (" + describe(ws) + "); see " + guestabi.FirstBootLog
	}
	return guestabi.FirstBootDone, "sshd installed with " + filepath.Base(pm)
}

// aptMirrors lists the host:port of every http(s) URI in root's apt
// sources, in order.
func aptMirrors(root string) []string {
	files, _ := filepath.Glob(filepath.Join(root, "etc/apt/sources.list.d/*"))
	files = append([]string{filepath.Join(root, "etc/apt/sources.list")}, files...)
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f) //nolint:gosec // the image's apt sources
		if err != nil {
			continue
		}
		var fields []string
		for _, line := range strings.Split(string(b), "\n") {
			if line, _, _ = strings.Cut(line, "#"); strings.TrimSpace(line) != "" {
				fields = append(fields, strings.Fields(line)...)
			}
		}
		for _, field := range fields {
			u, err := url.Parse(field)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				continue
			}
			port := u.Port()
			if port == "" {
				port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
			}
			hp := net.JoinHostPort(u.Hostname(), port)
			if !slices.Contains(out, hp) {
				out = append(out, hp)
			}
		}
	}
	return out
}

// reachMirror reports whether a TCP connection to one of the mirrors
// opens within timeout (name resolution included).
func reachMirror(mirrors []string, timeout time.Duration) error {
	if len(mirrors) == 0 {
		return errors.New("the image's apt sources name no http mirror")
	}
	var last error
	deadline := time.Now().Add(timeout)
	for _, m := range mirrors {
		left := time.Until(deadline)
		if left <= 0 {
			break
		}
		c, err := net.DialTimeout("tcp", m, left)
		if err == nil {
			_ = c.Close()
			return nil
		}
		last = err
	}
	return last
}

func appendFirstBootLog(line string) {
	f, err := os.OpenFile(guestabi.FirstBootLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	_, _ = fmt.Fprintln(f, line)
}

// ensureHostKeys makes the SSH host keys that are missing: ssh-keygen -A
// when the image has ssh-keygen, else an ed25519 key written here.
func ensureHostKeys(p *pid1) error {
	priv := strings.TrimSuffix(guestabi.HostKey, ".pub")
	if _, err := os.Stat(priv); err == nil {
		return nil
	}
	if kg, err := lookPath("/", "ssh-keygen", nil); err == nil {
		_, done, err := p.procs.start(kg, []string{"ssh-keygen", "-A"}, &syscall.ProcAttr{
			Dir: "/", Env: []string{"PATH=" + defaultPath}, Files: []uintptr{devNull(), 1, 2},
		})
		if err != nil {
			return err
		}
		if ws := <-done; !ws.Exited() || ws.ExitStatus() != 0 {
			return fmt.Errorf("ssh-keygen -A: %s", describe(ws))
		}
		if _, err := os.Stat(priv); err == nil {
			return nil
		}
	}
	return writeHostKey(priv)
}

// writeHostKey writes a new ed25519 host key pair at priv and priv.pub.
func writeHostKey(priv string) error {
	privPEM, line, err := agent.NewHostKey()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(priv), 0o755); err != nil {
		return err
	}
	if err := writeFileAtomic(priv, privPEM, 0o600); err != nil {
		return err
	}
	return writeFileAtomic(priv+".pub", []byte(line+"\n"), 0o644)
}
