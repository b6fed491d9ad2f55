package quota

import (
	"errors"
	"strings"
	"testing"
)

func TestCheckVM(t *testing.T) {
	l := Limits{VMCPUs: 8, VMMemory: 16 << 30, VMDisk: 100 << 30}
	for _, c := range []struct {
		cpus         int
		memory, disk int64
		want         string // "" for accepted; else a fragment of the error
	}{
		{2, 1 << 30, 10 << 30, ""},
		{8, 16 << 30, 100 << 30, ""},
		{0, 1 << 30, 0, "--cpus 0"},
		{9, 1 << 30, 0, "limits.vm_cpus"},
		{2, 64 << 20, 0, "--memory"},
		{2, 17 << 30, 0, "limits.vm_memory"},
		{2, 1 << 30, 101 << 30, "limits.vm_disk"},
	} {
		err := l.CheckVM(c.cpus, c.memory, c.disk)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("CheckVM(%d, %d, %d) = %v, want accepted", c.cpus, c.memory, c.disk, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrOutOfBounds)):
			t.Errorf("CheckVM(%d, %d, %d) = %v, want ErrOutOfBounds naming %q", c.cpus, c.memory, c.disk, err, c.want)
		}
	}
	// Unset bounds take the defaults.
	if err := (Limits{}).CheckVM(DefaultVMCPUs+1, 1<<30, 0); !errors.Is(err, ErrOutOfBounds) {
		t.Errorf("default vCPU bound not applied: %v", err)
	}
}

func TestCheckUser(t *testing.T) {
	l := Limits{VMs: 2, CPUs: 4, Memory: 4 << 30, Disk: 20 << 30}
	var used Usage
	used.Add(2, 2<<30, 10<<30)
	for _, c := range []struct {
		uid          uint32
		cpus         int
		memory, disk int64
		want         string
	}{
		{1000, 2, 2 << 30, 10 << 30, ""},
		{1000, 3, 1 << 30, 1 << 30, "limit cpus is 4"},
		{1000, 1, 3 << 30, 1 << 30, "limit memory is 4.0 GiB"},
		{1000, 1, 1 << 30, 11 << 30, "limit disk is 20.0 GiB"},
		{0, 64, 200 << 30, 1 << 40, ""}, // root is not limited
	} {
		err := l.CheckUser(c.uid, used, c.cpus, c.memory, c.disk)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("uid %d: CheckUser(%d, %d, %d) = %v, want accepted", c.uid, c.cpus, c.memory, c.disk, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrOverLimit)):
			t.Errorf("uid %d: CheckUser(%d, %d, %d) = %v, want ErrOverLimit with %q", c.uid, c.cpus, c.memory, c.disk, err, c.want)
		}
	}
	used.Add(1, 1<<30, 1<<30)
	if err := l.CheckUser(1000, used, 1, 128<<20, 0); err == nil || !strings.Contains(err.Error(), "limit vms is 2") {
		t.Errorf("third VM over vms=2: %v", err)
	}
}
