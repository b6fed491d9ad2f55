package guestabi

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

var cmpNet = cmp.Comparer(func(a, b netip.Addr) bool { return a == b })
var cmpPrefix = cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })

func full() Cmdline {
	return Cmdline{
		Kernel:     []string{"console=ttyS0", "panic=-1", "quiet"},
		Root:       "/dev/vda",
		RootFSType: "ext4",
		RootFlags:  "discard",
		ReadWrite:  true,
		Init:       InitPath,
		Network: Network{
			Address: netip.MustParsePrefix("10.77.0.5/24"),
			Gateway: netip.MustParseAddr("10.77.0.1"),
			DNS:     []netip.Addr{netip.MustParseAddr("1.1.1.1"), netip.MustParseAddr("9.9.9.9")},
			MAC:     net.HardwareAddr{0x52, 0x54, 0, 0xaa, 0xbb, 0xcc},
		},
		Hostname:   "vm-1",
		RootWait:   2500 * time.Millisecond,
		Debug:      true,
		NoEgress:   true,
		InitChoice: InitBanger,
		Main:       MainOverride{Cmd: []string{"sh", "-c", "echo \"hi there\"; exit 3"}, Env: []string{"A=b c", "EMPTY="}},
		Mounts:     []BootMount{{Dir: "/src"}, {Dir: "/mnt/my data", ReadOnly: true}},
		InitArgs:   []string{"single"},
	}
}

func TestEncodeParseRoundTrip(t *testing.T) {
	for name, c := range map[string]Cmdline{
		"full":     full(),
		"minimal":  {Root: "/dev/vda"},
		"empty":    {},
		"net only": {Network: Network{Address: netip.MustParsePrefix("192.168.50.2/30")}},
	} {
		t.Run(name, func(t *testing.T) {
			s, err := c.Encode()
			if err != nil {
				t.Fatalf("Encode(%+v): %v", c, err)
			}
			got, err := Parse(s)
			if err != nil {
				t.Fatalf("Parse(%q): %v", s, err)
			}
			if diff := cmp.Diff(c, got, cmpNet, cmpPrefix, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("Parse(Encode(c)) (-want +got):\n%s\ncommand line: %s", diff, s)
			}
		})
	}
}

func TestEncodeWords(t *testing.T) {
	s, err := full().Encode()
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"console=ttyS0", "root=/dev/vda", "rw", "init=" + InitPath, "banger.ip=10.77.0.5/24",
		"banger.gw=10.77.0.1", "banger.dns=1.1.1.1,9.9.9.9", "banger.mac=52:54:00:aa:bb:cc", "banger.hostname=vm-1",
		"banger.rootwait=2.5", "banger.debug", "banger.init=banger"} {
		if !strings.Contains(" "+s+" ", " "+w+" ") {
			t.Errorf("Encode() = %q, want the word %q", s, w)
		}
	}
	if !strings.HasSuffix(s, " -- single") {
		t.Errorf("Encode() = %q, want init arguments last after --", s)
	}
	if strings.ContainsAny(s, "\"") {
		t.Errorf("Encode() = %q holds a quote", s)
	}
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Cmdline
	}{
		{"console=ttyS0 panic=-1", Cmdline{Kernel: []string{"console=ttyS0", "panic=-1"}}},
		{"root=/dev/vdb rootfstype=xfs rw init=/lib/systemd/systemd banger.rootwait=2.5",
			Cmdline{Root: "/dev/vdb", RootFSType: "xfs", ReadWrite: true, Init: "/lib/systemd/systemd", RootWait: 2500 * time.Millisecond}},
		{`rw ro init="/sbin/my init" -- single x=1`, Cmdline{Init: "/sbin/my init", InitArgs: []string{"single", "x=1"}}},
		{"banger.ip=10.0.0.2/24 banger.ip=10.0.0.3/24\n", Cmdline{Network: Network{Address: netip.MustParsePrefix("10.0.0.3/24")}}},
		{"banger.debug=0 banger.init=image", Cmdline{InitChoice: InitImage}},
		{"banger.mac=52:54:00:AA:BB:CC", Cmdline{Network: Network{MAC: net.HardwareAddr{0x52, 0x54, 0, 0xaa, 0xbb, 0xcc}}}},
	} {
		got, err := Parse(tc.in)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.in, err)
			continue
		}
		if diff := cmp.Diff(tc.want, got, cmpNet, cmpPrefix, cmpopts.EquateEmpty()); diff != "" {
			t.Errorf("Parse(%q) (-want +got):\n%s", tc.in, diff)
		}
	}
}

func TestParseRejects(t *testing.T) {
	for name, in := range map[string]string{
		"uuid root":          "root=UUID=1234",
		"root escape":        "root=/dev/../etc/shadow",
		"relative init":      "init=sbin/init",
		"rootwait words":     "banger.rootwait=forever",
		"rootwait negative":  "banger.rootwait=-1",
		"rootwait too long":  "banger.rootwait=3601",
		"no prefix":          "banger.ip=10.0.0.2",
		"ipv6 ip":            "banger.ip=fd00::2/64",
		"gateway injection":  "banger.gw=10.0.0.1;id",
		"dns path":           "banger.dns=1.1.1.1/../x",
		"hostname injection": "banger.hostname=$(reboot)",
		"hostname option":    "banger.hostname=-F",
		"hostname long":      "banger.hostname=" + strings.Repeat("a", 64),
		"mac":                "banger.mac=02:00:00:00:00",
		"init choice":        "banger.init=openrc",
		"main not base64":    "banger.main=!!",
		"main not json":      "banger.main=bm90IGpzb24",
		"mounts not base64":  "banger.mounts=!!",
		"mount escape":       "banger.mounts=W3siZGlyIjoiL2EvLi4vZXRjIn1d", // [{"dir":"/a/../etc"}]
		"mount relative":     "banger.mounts=W3siZGlyIjoiZXRjIn1d",         // [{"dir":"etc"}]
	} {
		if _, err := Parse(in); !errors.Is(err, ErrCmdline) {
			t.Errorf("%s: Parse(%q) = %v, want ErrCmdline", name, in, err)
		}
	}
}

func TestEncodeRejects(t *testing.T) {
	for name, c := range map[string]Cmdline{
		"space in kernel word": {Kernel: []string{"a b"}},
		"dashdash kernel word": {Kernel: []string{"--"}},
		"quote in flags":       {RootFlags: `a"b`},
		"relative init":        {Init: "sbin/init"},
		"bad root":             {Root: "LABEL=x"},
		"bad hostname":         {Hostname: "a_b"},
		"gateway without ip":   {Network: Network{Gateway: netip.MustParseAddr("10.0.0.1")}},
		"bad init choice":      {InitChoice: "systemd"},
		"control in init arg":  {InitArgs: []string{"a\x01"}},
		"too long":             {Main: MainOverride{Cmd: []string{strings.Repeat("x", MaxCmdline)}}},
		"rootwait":             {RootWait: 2 * time.Hour},
		"mount at /":           {Mounts: []BootMount{{Dir: "/"}}},
		"relative mount":       {Mounts: []BootMount{{Dir: "src"}}},
		"unclean mount":        {Mounts: []BootMount{{Dir: "/a/../etc"}}},
		"control in mount":     {Mounts: []BootMount{{Dir: "/a\nb"}}},
		"mount twice":          {Mounts: []BootMount{{Dir: "/a"}, {Dir: "/a", ReadOnly: true}}},
	} {
		if s, err := c.Encode(); !errors.Is(err, ErrCmdline) {
			t.Errorf("%s: Encode() = %q, %v; want ErrCmdline", name, s, err)
		}
	}
}

func TestDefaults(t *testing.T) {
	var c Cmdline
	if c.RootDevice() != DefaultRoot || c.FSType() != DefaultRootFSType || c.RootWaitOrDefault() != DefaultRootWait || c.Choice() != InitAuto {
		t.Errorf("defaults of an empty command line: root %q fstype %q wait %s init %q", c.RootDevice(), c.FSType(), c.RootWaitOrDefault(), c.Choice())
	}
}

func TestMainOverride(t *testing.T) {
	img := ImageConfig{Entrypoint: []string{"/app"}, Cmd: []string{"--serve"}, Env: []string{"PATH=/bin", "A=1"}}
	got := MainOverride{Cmd: []string{"--once"}, Env: []string{"A=2", "B=3"}}.Apply(img)
	want := ImageConfig{Entrypoint: []string{"/app"}, Cmd: []string{"--once"}, Env: []string{"PATH=/bin", "A=2", "B=3"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Apply (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"/app", "--once"}, got.Argv()); diff != "" {
		t.Errorf("Argv (-want +got):\n%s", diff)
	}
	if !(MainOverride{}).Empty() || (MainOverride{Cmd: []string{}}).Empty() {
		t.Errorf("Empty: a nil Cmd changes nothing, an empty one clears the image's")
	}
	if diff := cmp.Diff(img, MainOverride{}.Apply(img)); diff != "" {
		t.Errorf("empty override changed the config (-want +got):\n%s", diff)
	}
}

func TestFirstBootState(t *testing.T) {
	for _, s := range []FirstBootState{FirstBootPending, FirstBootRunning, FirstBootDone, FirstBootFailed, FirstBootSkipped} {
		if !s.Valid() {
			t.Errorf("%q not valid", s)
		}
	}
	if FirstBootUnknown.Valid() || FirstBootState("done\n").Valid() {
		t.Errorf("unknown or unclean states count as valid")
	}
	if FirstBootRunning.Settled() || !FirstBootSkipped.Settled() {
		t.Errorf("Settled: running is not, skipped is")
	}
}
