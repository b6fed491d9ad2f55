package guestinit

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

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

// firstBootAndSSHD runs first boot when it is pending and can work (a
// package manager and a route out), else records why it is skipped; then
// starts the image's sshd, if it has one, with host keys.
func (p *pid1) firstBootAndSSHD() {
	if _, err := os.Lstat(guestabi.FirstBootMarker); err == nil {
		state, why := p.firstBoot()
		p.logf("first boot %s: %s", state, why)
		if state != guestabi.FirstBootFailed {
			_ = os.Remove(guestabi.FirstBootMarker)
		}
		if state != guestabi.FirstBootDone || p.sshdPath == "" {
			appendFirstBootLog("banger-first-boot: " + string(state) + ": " + why)
			_ = writeFileAtomic(guestabi.FirstBootStatus, []byte(string(state)+"\n"), 0o644)
		}
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

// firstBoot decides and, when it can, runs the sshd install.
func (p *pid1) firstBoot() (guestabi.FirstBootState, string) {
	if p.sshdPath != "" {
		return guestabi.FirstBootDone, "sshd is already installed"
	}
	pm := ""
	for _, name := range packageManagers {
		if path, err := lookPath("/", name, nil); err == nil {
			pm = path
			break
		}
	}
	switch {
	case pm == "":
		return guestabi.FirstBootSkipped, "the image has no package manager to install sshd with"
	case !p.haveNet:
		return guestabi.FirstBootSkipped, "the VM has no route out (no network or gateway) to install sshd"
	}
	if _, err := os.Stat("/bin/sh"); err != nil {
		return guestabi.FirstBootSkipped, "the image has no /bin/sh to run " + guestabi.FirstBootScript
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
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	block, err := ssh.MarshalPrivateKey(key, "")
	if err != nil {
		return err
	}
	spub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(priv), 0o755); err != nil {
		return err
	}
	if err := writeFileAtomic(priv, pem.EncodeToMemory(block), 0o600); err != nil {
		return err
	}
	return errors.Join(writeFileAtomic(priv+".pub", ssh.MarshalAuthorizedKey(spub), 0o644))
}
