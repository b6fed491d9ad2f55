package initramfs

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseCmdline(t *testing.T) {
	for _, tc := range []struct {
		in      string
		root    string
		fstype  string
		ro      bool
		init    string
		wait    time.Duration
		args    []string
		wantErr bool
	}{
		{in: "console=ttyS0 panic=-1", root: "/dev/vda", fstype: "ext4", ro: true, init: "", wait: 10 * time.Second},
		{in: "root=/dev/vdb rootfstype=xfs rw init=/lib/systemd/systemd banger.rootwait=2.5", root: "/dev/vdb", fstype: "xfs", init: "/lib/systemd/systemd", wait: 2500 * time.Millisecond},
		{in: `rw ro init="/sbin/my init" -- single x=1`, root: "/dev/vda", fstype: "ext4", ro: true, init: "/sbin/my init", wait: 10 * time.Second, args: []string{"single", "x=1"}},
		{in: "root=UUID=1234", wantErr: true},
		{in: "root=/dev/../etc/shadow", wantErr: true},
		{in: "init=sbin/init", wantErr: true},
		{in: "banger.rootwait=forever", wantErr: true},
	} {
		cfg, err := parseCmdline(tc.in)
		if tc.wantErr {
			if err == nil {
				t.Errorf("parseCmdline(%q) accepted", tc.in)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseCmdline(%q): %v", tc.in, err)
			continue
		}
		ro := cfg.flags&unix.MS_RDONLY != 0
		if cfg.root != tc.root || cfg.fstype != tc.fstype || ro != tc.ro || cfg.init != tc.init || cfg.rootwait != tc.wait || len(cfg.initArgs) != len(tc.args) {
			t.Errorf("parseCmdline(%q) = %+v", tc.in, cfg)
		}
		for i := range tc.args {
			if cfg.initArgs[i] != tc.args[i] {
				t.Errorf("parseCmdline(%q) init args = %q, want %q", tc.in, cfg.initArgs, tc.args)
			}
		}
	}
}
