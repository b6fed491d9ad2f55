package api

import (
	"time"

	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/model"
)

// VMSummary is one row of GET /v1/vms: what `banger vm ls` shows. The
// store keeps it precomputed beside each record, so that a listing is
// served without decoding a record.
type VMSummary struct {
	ID         string        `json:"id"`
	Name       string        `json:"name"`
	State      model.VMState `json:"state"`
	Reason     string        `json:"reason,omitempty"`
	IP         string        `json:"ip,omitempty"`
	VMM        string        `json:"vmm,omitempty"`
	DiskDriver string        `json:"disk_driver,omitempty"`
	Image      string        `json:"image"`
	OwnerUID   uint32        `json:"owner_uid"`
	Created    time.Time     `json:"created"`
	StartedAt  time.Time     `json:"started_at,omitzero"`
}

// SummaryOf returns the listing row of vm.
func SummaryOf(vm model.VM) VMSummary {
	return VMSummary{ID: vm.ID, Name: vm.Name, State: vm.State, Reason: vm.Reason, IP: vm.IP, VMM: vm.VMM,
		DiskDriver: vm.DiskDriver, Image: vm.Image, OwnerUID: vm.OwnerUID, Created: vm.Created, StartedAt: vm.StartedAt}
}

// VM is a VM as GET /v1/vms/{name} and the VM operations answer it: what
// its owner may know. The host-side internals — the runtime (monitor pid
// and command line, sockets, tap, loop and dm devices, disk files) and what
// recovery removed — are filled in for root callers only. Field names match
// the record's (model.VM), so a root caller may decode either.
type VM struct {
	ID            string        `json:"id"`
	Name          string        `json:"name"`
	OwnerUID      uint32        `json:"owner_uid"`
	Image         string        `json:"image"`
	ImageID       string        `json:"image_id"`
	Kernel        string        `json:"kernel"`
	CPUs          int           `json:"cpus"`
	MemoryMiB     int           `json:"memory_mib"`
	DiskBytes     int64         `json:"disk_bytes"`
	VMM           string        `json:"vmm"`
	DiskDriver    string        `json:"disk_driver"`
	IP            string        `json:"ip,omitempty"`
	MAC           string        `json:"mac,omitempty"`
	State         model.VMState `json:"state"`
	Reason        string        `json:"reason,omitempty"`
	Created       time.Time     `json:"created"`
	StartedAt     time.Time     `json:"started_at,omitzero"`
	StoppedAt     time.Time     `json:"stopped_at,omitzero"`
	FirstBoot     string        `json:"first_boot,omitempty"`
	FirstBootLog  []string      `json:"first_boot_log,omitempty"`
	HostKey       string        `json:"host_key,omitempty"`
	SSHKey        string        `json:"ssh_key,omitempty"`
	KernelCmdline string        `json:"kernel_cmdline,omitempty"`
	// Init is the init asked for (empty: auto), Cmd and Env the
	// main-process overrides; InitRan is the init the guest reported at its
	// last boot and Main banger's PID 1's last report of the main process.
	Init    guestabi.Init       `json:"init,omitempty"`
	Cmd     []string            `json:"cmd,omitempty"`
	Env     []string            `json:"env,omitempty"`
	InitRan guestabi.Init       `json:"init_ran,omitempty"`
	Main    *guestabi.MainState `json:"main,omitempty"`
	// Ports are the published ports with their host ports.
	Ports []Port `json:"ports,omitempty"`
	// Mounts are the host folders, HOSTDIR:GUESTDIR[:ro].
	Mounts []string `json:"mounts,omitempty"`

	// Runtime is what the running VM holds on the host; root only.
	Runtime *model.Runtime `json:"runtime,omitempty"`
	// Recovery is what the daemon did for the VM at its last start-up or
	// cleanup; root only.
	Recovery *model.Recovery `json:"recovery,omitempty"`
}

// ViewOf returns the view of vm for a caller; root sees the internals.
func ViewOf(vm model.VM, root bool) VM {
	v := VM{ID: vm.ID, Name: vm.Name, OwnerUID: vm.OwnerUID, Image: vm.Image, ImageID: vm.ImageID, Kernel: vm.Kernel,
		CPUs: vm.CPUs, MemoryMiB: vm.MemoryMiB, DiskBytes: vm.DiskBytes, VMM: vm.VMM, DiskDriver: vm.DiskDriver,
		IP: vm.IP, MAC: vm.MAC, State: vm.State, Reason: vm.Reason, Created: vm.Created, StartedAt: vm.StartedAt,
		StoppedAt: vm.StoppedAt, FirstBoot: vm.FirstBoot, FirstBootLog: vm.FirstBootLog, HostKey: vm.HostKey,
		SSHKey: vm.SSHKey, KernelCmdline: vm.KernelCmdline,
		Init: vm.Init, Cmd: vm.Cmd, Env: vm.Env, InitRan: vm.InitRan, Main: vm.Main}
	for _, m := range vm.Mounts {
		v.Mounts = append(v.Mounts, m.String())
	}
	for _, p := range vm.Ports {
		v.Ports = append(v.Ports, Port{HostIP: p.HostIP.String(), HostPort: p.HostPort, GuestPort: p.GuestPort, Proto: string(p.Proto)})
	}
	if root {
		rt, rec := vm.Runtime, vm.Recovery
		v.Runtime, v.Recovery = &rt, &rec
	}
	return v
}

// Port is one published port: the host address HostIP:HostPort forwards to
// the guest's GuestPort over Proto ("tcp" or "udp").
type Port struct {
	HostIP    string `json:"host_ip"`
	HostPort  uint16 `json:"host_port"`
	GuestPort uint16 `json:"guest_port"`
	Proto     string `json:"proto"`
}
