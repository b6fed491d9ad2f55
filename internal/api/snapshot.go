package api

import "time"

// SnapshotVMRequest is the body of POST /v1/vms/{name}/snapshot.
type SnapshotVMRequest struct {
	Name  string `json:"name"`
	Stop  bool   `json:"stop,omitempty"`  // stop the VM once it is saved
	Force bool   `json:"force,omitempty"` // save a VM with mounted folders (re-attached empty)
}

// CloneRequest is the body of POST /v1/snapshots/{name}/clone.
type CloneRequest struct {
	Name string `json:"name"`
	Wait bool   `json:"wait,omitempty"` // wait until the clone is ready
}

// Snapshot is a snapshot as GET /v1/snapshots and the snapshot operations
// answer it.
type Snapshot struct {
	ID       string          `json:"id"`
	Name     string          `json:"name"`
	OwnerUID uint32          `json:"owner_uid"`
	Created  time.Time       `json:"created"`
	SourceVM string          `json:"source_vm"`
	Machine  SnapshotMachine `json:"machine"`
	Files    []SnapshotFile  `json:"files"`
	// Size is the apparent size of its files; SizeOnDisk what they take.
	Size       int64         `json:"size"`
	SizeOnDisk int64         `json:"size_on_disk"`
	Pause      time.Duration `json:"pause_ns"` // how long the VM was paused
	Mounts     []string      `json:"mounts,omitempty"`
	InUseBy    []string      `json:"in_use_by,omitempty"` // VMs that run from its files
}

// SnapshotMachine is the saved VM's machine.
type SnapshotMachine struct {
	Monitor        string   `json:"monitor"`
	MonitorVersion string   `json:"monitor_version"`
	Accel          string   `json:"accel"`
	Kernel         string   `json:"kernel"`
	Image          string   `json:"image"`
	CPUs           int      `json:"cpus"`
	MemoryMiB      int      `json:"memory_mib"`
	Devices        []string `json:"devices"`
	MAC            string   `json:"mac,omitempty"`
	IP             string   `json:"ip,omitempty"`
	Hostname       string   `json:"hostname,omitempty"`
}

// SnapshotFile is one file of a snapshot.
type SnapshotFile struct {
	Name       string `json:"name"`
	Role       string `json:"role"`
	Size       int64  `json:"size"`
	SizeOnDisk int64  `json:"size_on_disk"`
	SHA256     string `json:"sha256"`
}

// SnapshotVMResult answers POST /v1/vms/{name}/snapshot.
type SnapshotVMResult struct {
	Snapshot Snapshot `json:"snapshot"`
	VM       VM       `json:"vm"`
}
