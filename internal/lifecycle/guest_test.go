package lifecycle

import (
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
)

func TestGuestCmdline(t *testing.T) {
	d := New(Options{Config: config.Config{DNS: []string{"1.1.1.1", "9.9.9.9"}}, Logger: slog.New(slog.DiscardHandler)})
	nc := netctl.Config{Subnet: netip.MustParsePrefix("10.77.0.0/24")}
	vm := model.VM{Name: "dev_box", IP: "10.77.0.5", MAC: "06:00:0a:4d:00:05", Init: guestabi.InitBanger,
		Cmd: []string{"sh", "-c", "echo hi"}, Env: []string{"A=b c"}}
	line := d.cmdline(vm, nc, "/boot/initrd", false)
	c, err := guestabi.Parse(line)
	if err != nil {
		t.Fatalf("the guest cannot parse %q: %v", line, err)
	}
	if c.Network.Address.String() != "10.77.0.5/24" || c.Network.Gateway != nc.Gateway() || c.Network.MAC.String() != vm.MAC ||
		len(c.Network.DNS) != 2 || c.Hostname != "dev-box" || c.Choice() != guestabi.InitBanger || c.RootDevice() != "/dev/vda" ||
		!c.ReadWrite || c.Init != "" || c.NoEgress || strings.Join(c.Main.Cmd, "|") != "sh|-c|echo hi" || c.Main.Env[0] != "A=b c" {
		t.Errorf("cmdline %q parsed to %+v", line, c)
	}
	if !strings.Contains(line, "console=ttyS0") {
		t.Errorf("cmdline %q lacks the serial console", line)
	}
	vm.Init = guestabi.InitAuto
	if c, _ := guestabi.Parse(d.cmdline(vm, nc, "/boot/initrd", false)); c.InitChoice != "" {
		t.Errorf("auto written as banger.init=%s; the default needs no key", c.InitChoice)
	}
	if c, _ := guestabi.Parse(d.cmdline(vm, nc, "/boot/initrd", true)); !c.NoEgress {
		t.Errorf("a host without a way out: the guest is not told %s", guestabi.KeyNoEgress)
	}
}

func TestGuestOptions(t *testing.T) {
	init, cmd, env, err := guestOptions(api.CreateVMRequest{Cmd: []string{"a"}, Env: []string{"K=v", "E="}})
	if err != nil || init != guestabi.InitAuto || len(cmd) != 1 || len(env) != 2 {
		t.Errorf("guestOptions = %q %q %q %v", init, cmd, env, err)
	}
	for name, req := range map[string]api.CreateVMRequest{
		"init":     {Init: "systemd"},
		"env form": {Env: []string{"novalue"}},
		"env key":  {Env: []string{"=x"}},
		"env nl":   {Env: []string{"A=1\nB=2"}},
		"cmd nul":  {Cmd: []string{"a\x00b"}},
		"too long": {Cmd: []string{strings.Repeat("x", guestabi.MaxCmdline)}},
	} {
		if _, _, _, err := guestOptions(req); !isInvalid(err) {
			t.Errorf("%s: guestOptions(%+v) = %v, want an invalid-input error", name, req, err)
		}
	}
}

func isInvalid(err error) bool {
	var e *api.Error
	return errors.As(err, &e) && e.Code == api.CodeInvalid
}
