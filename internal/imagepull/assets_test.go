package imagepull

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testutil"
)

// recorder is a script standing in for a guest program: it appends its
// name and arguments (and DEBIAN_FRONTEND for apt-get) to the record file,
// and exits with $FAIL_<name> when that is set.
const recorder = `#!/bin/sh
name=${0##*/}
line="$name $*"
[ "$name" = apt-get ] && line="$line [DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-}]"
echo "$line" >>"$BANGER_TEST_RECORD"
var=$(echo "FAIL_$name" | tr -c 'A-Za-z0-9_\n' _)
eval "code=\${$var:-0}"
exit "$code"
`

// scriptEnv is a sandbox to run an asset script in: a fake root, and a
// PATH holding only the recording stand-ins and the basic tools the
// scripts use, so that the host's own apt-get or systemctl can never run.
type scriptEnv struct {
	root, bin, record string
}

func newScriptEnv(t *testing.T, standIns ...string) *scriptEnv {
	t.Helper()
	testutil.RequiresTool(t, "sh")
	e := &scriptEnv{root: t.TempDir(), bin: t.TempDir()}
	e.record = filepath.Join(t.TempDir(), "record")
	for _, tool := range []string{"sh", "sed", "head", "mkdir", "dirname", "mv", "rm", "date", "cat", "tr", "grep", "sleep"} {
		testutil.RequiresTool(t, tool)
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(p, filepath.Join(e.bin, tool)); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range standIns {
		if err := os.WriteFile(filepath.Join(e.bin, s), []byte(recorder), 0o700); err != nil { // #nosec G306 -- an executable stand-in
			t.Fatal(err)
		}
	}
	return e
}

func (e *scriptEnv) write(t *testing.T, rel, content string, mode os.FileMode) {
	t.Helper()
	p := filepath.Join(e.root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

// run runs assets/<script> with sh and returns its exit code, combined
// output and the recorded commands.
func (e *scriptEnv) run(t *testing.T, script string, env ...string) (int, string, []string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(e.bin, "sh"), filepath.Join("assets", script))
	cmd.Env = append([]string{"PATH=" + e.bin, "BANGER_ROOT=" + e.root, "BANGER_TEST_RECORD=" + e.record}, env...)
	out, err := cmd.CombinedOutput()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError) //nolint:errorlint // exec returns it unwrapped
		if !ok {
			t.Fatalf("run %s: %v", script, err)
		}
		code = ee.ExitCode()
	}
	rec, err := os.ReadFile(e.record)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var lines []string
	if s := strings.TrimSpace(string(rec)); s != "" {
		lines = strings.Split(s, "\n")
	}
	return code, string(out), lines
}

func (e *scriptEnv) exists(rel string) bool {
	_, err := os.Lstat(filepath.Join(e.root, rel))
	return err == nil
}

func (e *scriptEnv) read(t *testing.T, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.root, rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestShellcheckAssets(t *testing.T) {
	testutil.RequiresTool(t, "shellcheck")
	for _, s := range []string{"assets/first-boot.sh"} {
		if out, err := exec.Command("shellcheck", "-s", "sh", s).CombinedOutput(); err != nil {
			t.Errorf("shellcheck %s: %v\n%s", s, err, out)
		}
	}
}

func TestFirstBootDispatch(t *testing.T) {
	apt := []string{
		"apt-get -o Acquire::Retries=0 -o Acquire::http::Timeout=15 update [DEBIAN_FRONTEND=]",
		"apt-get install -y openssh-server [DEBIAN_FRONTEND=noninteractive]",
		"systemctl enable --now ssh",
	}
	apk := []string{"apk add --no-cache openssh-server", "systemctl enable --now sshd"}
	dnf := []string{"dnf install -y openssh-server", "systemctl enable --now sshd"}
	pacman := []string{"pacman -Sy --noconfirm --needed openssh", "systemctl enable --now sshd"}
	zypper := []string{"zypper --non-interactive install openssh", "systemctl enable --now sshd"}
	cases := []struct {
		osRelease string
		want      []string
	}{
		{"ID=debian\n", apt},
		{"ID=ubuntu\nID_LIKE=debian\n", apt},
		{"ID=kali\n", apt},
		{"ID=raspbian\n", apt},
		{"ID=linuxmint\n", apt},
		{"ID=pop\n", apt},
		{"ID=alpine\n", apk},
		{"ID=fedora\n", dnf},
		{`ID="rhel"` + "\n", dnf},
		{"ID=centos\n", dnf},
		{"ID=rocky\n", dnf},
		{"ID='almalinux'\n", dnf},
		{"ID=arch\n", pacman},
		{"ID=archlinux\n", pacman},
		{"ID=manjaro\n", pacman},
		{"ID=\"opensuse-leap\"\n", zypper},
		{"ID=opensuse-tumbleweed\n", zypper},
		{"ID=suse\n", zypper},
		// Unknown IDs fall back to ID_LIKE, in order.
		{"NAME=x\nID=neon\nID_LIKE=\"ubuntu debian\"\n", apt},
		{"ID=ol\nID_LIKE=\"fedora\"\n", dnf},
		{"ID=sles\nID_LIKE=\"suse\"\n", zypper},
		{"ID=endeavouros\nID_LIKE=arch\n", pacman},
	}
	for _, tc := range cases {
		t.Run(strings.Fields(tc.osRelease)[0], func(t *testing.T) {
			e := newScriptEnv(t, "apt-get", "apk", "dnf", "pacman", "zypper", "systemctl")
			e.write(t, "etc/os-release", tc.osRelease, 0o644)
			e.write(t, "var/lib/banger/first-boot-pending", "", 0o644)
			code, out, got := e.run(t, "first-boot.sh")
			if code != 0 || strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Fatalf("os-release %q: exit %d, commands\n%s\nwant\n%s\noutput: %s\nlog: %s",
					tc.osRelease, code, strings.Join(got, "\n"), strings.Join(tc.want, "\n"), out, e.read(t, "var/log/banger-first-boot.log"))
			}
			if e.exists("var/lib/banger/first-boot-pending") {
				t.Errorf("marker kept after success")
			}
			if s := e.read(t, "var/lib/banger/first-boot-status"); s != "done\n" {
				t.Errorf("status %q, want done", s)
			}
		})
	}
}

func TestFirstBootFailures(t *testing.T) {
	for _, tc := range []struct {
		name      string
		osRelease string
		env       []string
		want      []string
		logHas    string
	}{
		{"unknown distro", "ID=plan9\nID_LIKE=\"bell-labs\"\n", nil, nil, "unsupported distribution: ID=plan9"},
		{"no os-release", "", nil, nil, "no os-release"},
		{"apt-get update fails", "ID=debian\n", []string{"FAIL_apt_get=100"}, []string{"apt-get -o Acquire::Retries=0 -o Acquire::http::Timeout=15 update [DEBIAN_FRONTEND=]"}, "installing the SSH server with apt failed"},
		{"dnf install fails", "ID=fedora\n", []string{"FAIL_dnf=1"}, []string{"dnf install -y openssh-server"}, "with dnf failed"},
		{"enable fails", "ID=arch\n", []string{"FAIL_systemctl=1"}, []string{"pacman -Sy --noconfirm --needed openssh", "systemctl enable --now sshd"}, "enabling the SSH service failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newScriptEnv(t, "apt-get", "apk", "dnf", "pacman", "zypper", "systemctl")
			if tc.osRelease != "" {
				e.write(t, "etc/os-release", tc.osRelease, 0o644)
			}
			e.write(t, "var/lib/banger/first-boot-pending", "", 0o644)
			code, out, got := e.run(t, "first-boot.sh", tc.env...)
			if code == 0 {
				t.Fatalf("exit 0, want failure; output %s", out)
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("commands\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
			if !e.exists("var/lib/banger/first-boot-pending") {
				t.Errorf("marker removed after a failure: the next boot would not retry")
			}
			if s := e.read(t, "var/lib/banger/first-boot-status"); s != "failed\n" {
				t.Errorf("status %q, want failed", s)
			}
			if log := e.read(t, "var/log/banger-first-boot.log"); !strings.Contains(log, tc.logHas) {
				t.Errorf("log lacks %q:\n%s", tc.logHas, log)
			}
		})
	}
}

func TestFirstBootSkipsInstalledSSHD(t *testing.T) {
	e := newScriptEnv(t, "apt-get", "systemctl")
	e.write(t, "etc/os-release", "ID=debian\n", 0o644)
	e.write(t, "usr/sbin/sshd", "#!/bin/sh\n", 0o755)
	e.write(t, "var/lib/banger/first-boot-pending", "", 0o644)
	code, out, got := e.run(t, "first-boot.sh")
	if code != 0 || strings.Join(got, "|") != "systemctl enable --now ssh" {
		t.Fatalf("exit %d, commands %q, want only the enable; output %s", code, got, out)
	}
	if e.exists("var/lib/banger/first-boot-pending") {
		t.Errorf("marker kept")
	}
	if log := e.read(t, "var/log/banger-first-boot.log"); !strings.Contains(log, "already installed") {
		t.Errorf("log does not say the install was skipped:\n%s", log)
	}
}

func TestFirstBootOpenRC(t *testing.T) {
	e := newScriptEnv(t, "apk", "rc-update", "rc-service")
	e.write(t, "etc/os-release", "ID=alpine\n", 0o644)
	e.write(t, "var/lib/banger/first-boot-pending", "", 0o644)
	code, out, got := e.run(t, "first-boot.sh")
	want := "apk add --no-cache openssh-server|rc-update add sshd default|rc-service sshd start"
	if code != 0 || strings.Join(got, "|") != want {
		t.Fatalf("exit %d, commands %q, want %q; output %s", code, got, want, out)
	}
}

// TestUnits checks the unit files for the settings the boot sequence
// depends on.
func TestUnits(t *testing.T) {
	for unit, must := range map[string][]string{
		"banger-network.service":     {"Type=oneshot", "Before=network.target", "ExecStart=" + GuestAgentPath + " network", "WantedBy=multi-user.target"},
		"banger-first-boot.service":  {"ConditionPathExists=" + GuestFirstBootPending, "After=banger-network.service network-online.target", "ExecStart=/bin/sh " + GuestFirstBootScript, "WantedBy=multi-user.target"},
		"banger-vsock-agent.service": {"Restart=always", "ExecStart=" + GuestAgentPath, "WantedBy=multi-user.target", "Type=notify", "DefaultDependencies=no", "Before=basic.target shutdown.target", "Conflicts=shutdown.target"},
	} {
		b, err := assetFS.ReadFile("assets/" + unit)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range must {
			if !strings.Contains(string(b), m) {
				t.Errorf("%s lacks %q", unit, m)
			}
		}
	}
}

// TestFirstBootUnderBangerInit: banger's PID 1 starts sshd itself, so the
// script installs it and enables nothing.
func TestFirstBootUnderBangerInit(t *testing.T) {
	e := newScriptEnv(t, "apt-get", "apk", "dnf", "pacman", "zypper", "systemctl")
	e.write(t, "etc/os-release", "ID=debian\n", 0o644)
	e.write(t, "var/lib/banger/first-boot-pending", "", 0o644)
	code, out, got := e.run(t, "first-boot.sh", "BANGER_INIT=banger")
	want := []string{
		"apt-get -o Acquire::Retries=0 -o Acquire::http::Timeout=15 update [DEBIAN_FRONTEND=]",
		"apt-get install -y openssh-server [DEBIAN_FRONTEND=noninteractive]",
	}
	if code != 0 || strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("exit %d, commands\n%s\nwant\n%s\noutput: %s", code, strings.Join(got, "\n"), strings.Join(want, "\n"), out)
	}
	if s := e.read(t, "var/lib/banger/first-boot-status"); s != "done\n" {
		t.Errorf("status %q, want done", s)
	}
}
