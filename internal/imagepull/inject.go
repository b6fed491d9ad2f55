package imagepull

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/bangerdev/banger/internal/guestabi"
)

// assetFS holds the guest-side scripts and units, see assets/.
//
//go:embed assets
var assetFS embed.FS

// Where InjectGuestAgents puts things in the guest. The guest paths
// banger's guest program also uses come from guestabi.
const (
	GuestAgentPath        = guestabi.AgentPath
	GuestLibDir           = guestabi.LibDir
	GuestFirstBootScript  = guestabi.FirstBootScript
	GuestUnitDir          = "/etc/systemd/system"
	GuestWantsDir         = GuestUnitDir + "/multi-user.target.wants"
	GuestModulesLoadFile  = "/etc/modules-load.d/banger-vsock.conf"
	GuestStateDir         = guestabi.StateDir
	GuestFirstBootPending = guestabi.FirstBootMarker // present until first boot succeeds
	GuestFirstBootStatus  = guestabi.FirstBootStatus // a guestabi.FirstBootState
	GuestFirstBootLog     = guestabi.FirstBootLog
)

// GuestUnits are the systemd units InjectGuestAgents installs and enables.
var GuestUnits = []string{"banger-network.service", "banger-first-boot.service", "banger-vsock-agent.service"}

// ErrGuestLayout is returned when the image has something in the way of a
// file banger injects: a directory where a file goes, or a non-directory
// (a symlink included: banger never writes through one) where a directory
// must be.
var ErrGuestLayout = errors.New("image layout prevents injecting banger's guest files")

// GuestAssets are the host-side inputs of InjectGuestAgents that are not
// embedded in banger itself.
type GuestAssets struct {
	// AgentBinary is the host path of the static banger-vsock-agent
	// executable (banger's guest program: agent and PID 1). Required.
	AgentBinary string
	// Config is the image's run configuration, written to
	// guestabi.ImageConfigFile for banger's PID 1. Nil writes none.
	Config *guestabi.ImageConfig
	// SSHDReady says the image's sshd is installed, enabled and has its
	// host key (GuestFacts.SSHDReady): first boot has nothing to do, so
	// neither its marker nor a pending status is written.
	SSHDReady bool
}

// injectFile is one regular file to put in the guest.
type injectFile struct {
	guest string // absolute path in the image
	mode  uint32 // full mode, type bits included
	asset string // name under assets/, or "" when host is set
	host  string // host file to copy
	data  string // literal content when asset and host are empty
}

// guestFiles lists what InjectGuestAgents writes: the program files, then
// the first-boot state and the run config.
func guestFiles(a GuestAssets) []injectFile {
	files := programFiles(a.AgentBinary)
	if a.SSHDReady {
		files = append(files, injectFile{guest: GuestFirstBootStatus, mode: 0o100644, data: string(guestabi.FirstBootDone) + "\n"})
	} else {
		files = append(files, injectFile{guest: GuestFirstBootPending, mode: 0o100644},
			injectFile{guest: GuestFirstBootStatus, mode: 0o100644, data: string(guestabi.FirstBootPending) + "\n"})
	}
	if a.Config != nil {
		b, _ := json.MarshalIndent(a.Config, "", "  ") // plain strings: cannot fail
		files = append(files, injectFile{guest: guestabi.ImageConfigFile, mode: 0o100644, data: string(b) + "\n"})
	}
	return files
}

// programFiles are banger's guest program and what starts it: the agent
// binary, the first-boot script, the vsock modules-load file and the
// systemd units. They hold no state of the image, so RefreshGuestAgent
// rewrites exactly these (and guestLinks).
func programFiles(agentBinary string) []injectFile {
	files := []injectFile{
		{guest: GuestAgentPath, mode: 0o100755, host: agentBinary},
		{guest: GuestFirstBootScript, mode: 0o100755, asset: "first-boot.sh"},
		{guest: GuestModulesLoadFile, mode: 0o100644, asset: "banger-vsock.conf"},
	}
	for _, u := range GuestUnits {
		files = append(files, injectFile{guest: GuestUnitDir + "/" + u, mode: 0o100644, asset: u})
	}
	return files
}

// guestLinks maps each multi-user.target.wants link to its target, as
// `systemctl enable` would make it, and banger's PID 1 (guestabi.InitPath)
// to the guest program.
func guestLinks() map[string]string {
	links := map[string]string{guestabi.InitPath: GuestAgentPath}
	for _, u := range GuestUnits {
		links[GuestWantsDir+"/"+u] = GuestUnitDir + "/" + u
	}
	return links
}

// InjectGuestAgents adds banger's guest side to the ext4 image at ext4Path,
// owned by root, with one debugfs script (no mount): the agent binary at
// GuestAgentPath, banger-network.service (the guest program's network mode),
// the first-boot script and banger-first-boot.service,
// banger-vsock-agent.service, the multi-user.target.wants links that enable
// all three, the vsock modules-load.d file, the first-boot marker and
// status ("pending"), the link guestabi.InitPath to the agent binary
// (banger's PID 1 for images without systemd) and, when a.Config is set,
// the image's run configuration at guestabi.ImageConfigFile. Missing parent directories are created (root, 0755).
//
// It is idempotent: files and links that exist are replaced. It fails with
// ErrGuestLayout rather than write through a symlink or over a directory.
func InjectGuestAgents(ctx context.Context, ext4Path string, a GuestAssets) error {
	abs, agent, err := injectPaths(ext4Path, a.AgentBinary)
	if err != nil {
		return fmt.Errorf("inject guest agents: %w", err)
	}
	a.AgentBinary = agent
	if err := inject(ctx, abs, guestFiles(a), guestLinks()); err != nil {
		return fmt.Errorf("inject guest agents into %q: %w", abs, err)
	}
	return nil
}

// RefreshGuestAgent replaces banger's guest program in the ext4 image at
// ext4Path with agentBinary, and its systemd units, first-boot script,
// modules-load file, unit links and the PID 1 link with this banger's,
// as InjectGuestAgents writes them. It leaves the image's state alone:
// the first-boot marker and status, the run config, the SSH host keys
// and authorized keys, everything else. Same refusals as
// InjectGuestAgents (ErrGuestLayout).
func RefreshGuestAgent(ctx context.Context, ext4Path, agentBinary string) error {
	abs, agent, err := injectPaths(ext4Path, agentBinary)
	if err != nil {
		return fmt.Errorf("refresh the guest agent: %w", err)
	}
	if err := inject(ctx, abs, programFiles(agent), guestLinks()); err != nil {
		return fmt.Errorf("refresh the guest agent in %q: %w", abs, err)
	}
	return nil
}

// injectPaths makes the image and agent paths absolute and checks that the
// agent binary is a regular file.
func injectPaths(ext4Path, agentBinary string) (string, string, error) {
	abs, err := filepath.Abs(ext4Path)
	if err != nil {
		return "", "", fmt.Errorf("%q: %w", ext4Path, err)
	}
	if agentBinary == "" {
		return "", "", fmt.Errorf("into %q: no agent binary given", abs)
	}
	agent, err := filepath.Abs(agentBinary)
	if err != nil {
		return "", "", fmt.Errorf("agent binary %q: %w", agentBinary, err)
	}
	if st, err := os.Stat(agent); err != nil {
		return "", "", fmt.Errorf("agent binary: %w", err)
	} else if !st.Mode().IsRegular() {
		return "", "", fmt.Errorf("agent binary %q is not a regular file", agent)
	}
	return abs, agent, nil
}

// inject writes files and links into the ext4 image abs with one debugfs
// script, root-owned, making missing parent directories (root, 0755) and
// replacing what exists; it refuses to write through a symlink or over a
// directory (ErrGuestLayout).
func inject(ctx context.Context, abs string, files []injectFile, links map[string]string) error {
	// Every ancestor directory, parents first, then the files and links.
	var dirs []string
	seen := map[string]bool{}
	var addDirs func(p string)
	addDirs = func(p string) {
		if p == "/" || seen[p] {
			return
		}
		addDirs(path.Dir(p))
		seen[p] = true
		dirs = append(dirs, p)
	}
	targets := make([]string, 0, len(files)+len(links))
	for _, f := range files {
		addDirs(path.Dir(f.guest))
		targets = append(targets, f.guest)
	}
	for l := range links {
		addDirs(path.Dir(l))
		targets = append(targets, l)
	}
	kinds, err := probe(ctx, abs, append(append([]string{}, dirs...), targets...))
	if err != nil {
		return err
	}

	tmp, err := os.MkdirTemp("", "banger-inject-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(tmp) }()

	var s script
	for _, d := range dirs {
		switch kinds[d] {
		case kindDir:
		case kindMissing:
			s.add("mkdir", qpath(d))
			setRoot(&s, d, 0o040755)
		default:
			return fmt.Errorf("%q is a %s, not a directory: %w", d, kinds[d], ErrGuestLayout)
		}
	}
	for _, t := range targets {
		switch kinds[t] {
		case kindMissing:
		case kindDir:
			return fmt.Errorf("%q is a directory: %w", t, ErrGuestLayout)
		default:
			s.add("rm", qpath(t))
		}
	}
	for i, f := range files {
		src := f.host
		if src == "" {
			content := []byte(f.data)
			if f.asset != "" {
				if content, err = assetFS.ReadFile("assets/" + f.asset); err != nil {
					return fmt.Errorf("asset %s: %w", f.asset, err)
				}
			}
			src = filepath.Join(tmp, fmt.Sprintf("%d-%s", i, path.Base(f.guest)))
			if err := os.WriteFile(src, content, 0o600); err != nil {
				return fmt.Errorf("stage %s: %w", f.guest, err)
			}
		}
		// write takes a name in the current directory, not a path.
		dir, base := path.Split(f.guest)
		s.add("cd", qpath(dir))
		s.add("write", qpath(src), qbase(base))
		s.add("cd", qpath("/"))
		setRoot(&s, f.guest, f.mode)
	}
	for _, l := range slices.Sorted(maps.Keys(links)) {
		s.add("symlink", qpath(l), qpath(links[l]))
		s.add("set_inode_field", qpath(l), lit("uid"), lit("0"))
		s.add("set_inode_field", qpath(l), lit("gid"), lit("0"))
	}
	if _, err := runDebugfs(ctx, abs, &s, true); err != nil {
		return err
	}
	return nil
}

// setRoot makes p owned by 0:0 with the full mode.
func setRoot(s *script, p string, mode uint32) {
	s.add("set_inode_field", qpath(p), lit("uid"), lit("0"))
	s.add("set_inode_field", qpath(p), lit("gid"), lit("0"))
	s.add("set_inode_field", qpath(p), lit("mode"), lit(fmt.Sprintf("0%o", mode)))
}

// CheckExt4 runs e2fsck -fn on the ext4 image at ext4Path (read-only: it
// changes nothing) and fails unless the file system is clean.
func CheckExt4(ctx context.Context, ext4Path string) error {
	cmd := exec.CommandContext(ctx, "e2fsck", "-fn", ext4Path) // #nosec G204 -- a fixed program; the argument is a path
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("e2fsck -fn %s: %w: %s", ext4Path, err, strings.TrimSpace(lastLines(string(out), 8)))
	}
	return nil
}

// lastLines keeps the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
