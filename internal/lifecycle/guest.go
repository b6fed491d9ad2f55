package lifecycle

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
)

// Limits on a VM's main-process overrides (they travel on the kernel
// command line, which holds guestabi.MaxCmdline bytes in all).
const (
	maxEnvEntries = 64
	// readyPoll is how often the boot waiter asks the agent whether first
	// boot and sshd are done.
	readyPoll = 200 * time.Millisecond
)

// guestOptions validates the init choice and the main-process overrides
// of a create request.
func guestOptions(req api.CreateVMRequest) (guestabi.Init, []string, []string, error) {
	init := guestabi.Init(req.Init)
	if init == "" {
		init = guestabi.InitAuto
	}
	if !init.Valid() {
		return "", nil, nil, api.Errorf(api.CodeInvalid, "--init %q: use auto, image or banger", req.Init)
	}
	if len(req.Env) > maxEnvEntries {
		return "", nil, nil, api.Errorf(api.CodeInvalid, "--env: %d entries, at most %d", len(req.Env), maxEnvEntries)
	}
	for _, kv := range req.Env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return "", nil, nil, api.Errorf(api.CodeInvalid, "--env %q: want KEY=value", kv)
		}
		if strings.ContainsAny(kv, "\x00\n") {
			return "", nil, nil, api.Errorf(api.CodeInvalid, "--env %q: no NUL or newline", kv)
		}
	}
	for _, a := range req.Cmd {
		if strings.ContainsRune(a, 0) {
			return "", nil, nil, api.Errorf(api.CodeInvalid, "--cmd: an argument holds a NUL byte")
		}
	}
	// The overrides ride on the kernel command line: refuse now what would
	// not fit, rather than at every start.
	probe := guestabi.Cmdline{Main: guestabi.MainOverride{Cmd: req.Cmd, Env: req.Env}}
	if s, err := probe.Encode(); err != nil || len(s) > guestabi.MaxCmdline-512 {
		return "", nil, nil, api.Errorf(api.CodeInvalid, "--cmd and --env are too long for the kernel command line (%d bytes encoded, at most %d): shorten them", len(s), guestabi.MaxCmdline-512)
	}
	return init, req.Cmd, req.Env, nil
}

// cmdline is the guest kernel command line: root disk, serial console,
// the network settings, the hostname, the init choice, the main-process
// overrides and the guest folders of the VM's mounts (guestabi.Cmdline),
// and banger.noegress when the host has no way out (noEgress). Without an
// initramfs to pick the init, the kernel starts banger's init in images
// that have it, and banger's init applies the same rule.
func (s *Service) cmdline(vm model.VM, nc netctl.Config, initrd string, noEgress bool) string {
	c := guestabi.Cmdline{
		Kernel:    []string{"console=ttyS0", "panic=-1", "quiet", "loglevel=4", "net.ifnames=0"},
		Root:      guestabi.DefaultRoot,
		ReadWrite: true,
		Hostname:  hostnameFor(vm.Name),
		Main:      guestabi.MainOverride{Cmd: vm.Cmd, Env: vm.Env},
		Mounts:    bootMounts(vm.Mounts),
		NoEgress:  noEgress,
	}
	if vm.Init != "" && vm.Init != guestabi.InitAuto {
		c.InitChoice = vm.Init
	}
	if ip, err := netip.ParseAddr(vm.IP); err == nil {
		c.Network.Address = netip.PrefixFrom(ip, nc.Subnet.Bits())
		c.Network.Gateway = nc.Gateway()
	}
	if mac, err := net.ParseMAC(vm.MAC); err == nil {
		c.Network.MAC = mac
	}
	for _, d := range s.cfg.DNS {
		if a, err := netip.ParseAddr(d); err == nil {
			c.Network.DNS = append(c.Network.DNS, a)
		}
	}
	if initrd == "" && vm.Init != guestabi.InitImage {
		if img, err := s.store.GetImage(vm.ImageID); err == nil && img.Init != "" {
			c.Init = guestabi.InitPath
		}
	}
	line, err := c.Encode()
	if err != nil {
		// create validated the overrides: drop them rather than not boot.
		s.log.Warn("kernel command line: dropping the main-process overrides", "vm", vm.Name, "err", err)
		c.Main = guestabi.MainOverride{}
		if line, err = c.Encode(); err != nil {
			// The folders are still mounted once the agent is up, only
			// not before the guest's services start.
			s.log.Warn("kernel command line: dropping the boot-time mounts", "vm", vm.Name, "err", err)
			c.Mounts = nil
			line, _ = c.Encode()
		}
	}
	return line
}

// hostnameFor is a VM name as an RFC 1123 host name ('_' becomes '-').
func hostnameFor(name string) string {
	h := strings.Trim(strings.ReplaceAll(name, "_", "-"), "-.")
	if guestabi.CheckHostname(h) != nil {
		return "banger-vm"
	}
	return h
}

// recordGuestStatus copies what the agent reported about the guest's init
// and main process into the VM record.
func recordGuestStatus(v *model.VM, st *agent.Status) {
	if st == nil {
		return
	}
	if st.Init == guestabi.InitImage || st.Init == guestabi.InitBanger {
		v.InitRan = st.Init
	}
	v.Main = st.Main
}

// GuestState refreshes a running VM's main-process state from its agent
// (vm inspect), through the VM's agent session, within a short timeout;
// on any failure it returns the recorded state.
func (s *Service) GuestState(ctx context.Context, vm model.VM) model.VM {
	if vm.State != model.VMRunning || vm.InitRan != guestabi.InitBanger {
		return vm
	}
	sup := s.Supervisor(vm.ID)
	if sup == nil {
		return vm
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c, err := sup.Session(cctx)
	if err != nil {
		return vm
	}
	st, err := c.Status(cctx)
	if err != nil {
		sup.DropSession(c)
		return vm
	}
	if upd, err := s.store.UpdateVM(vm.ID, func(v *model.VM) error { recordGuestStatus(v, st); return nil }); err == nil {
		return upd
	}
	recordGuestStatus(&vm, st)
	return vm
}

// initNote says which init a VM of img will boot with, for progress.
func initNote(img model.Image, asked guestabi.Init) string {
	switch {
	case asked == guestabi.InitBanger:
		return "banger's init (asked)"
	case asked == guestabi.InitImage:
		return "the image's init (asked)"
	case img.Init == guestabi.InitBanger:
		return "banger's init: " + img.InitReason
	case img.Init == guestabi.InitImage:
		return "the image's init: " + img.InitReason
	}
	return fmt.Sprintf("the image's init (image %q was pulled by an older banger)", img.Name)
}
