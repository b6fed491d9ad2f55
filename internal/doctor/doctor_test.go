package doctor

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func find(cs []Check, name string) Check {
	for _, c := range cs {
		if c.Name == name {
			return c
		}
	}
	return Check{}
}

// TestDoctorOnThisHost checks the doctor's verdicts against facts detected
// here independently: the raw kernel module list and device nodes.
func TestDoctorOnThisHost(t *testing.T) {
	cs := Run(context.Background(), DefaultHost(), t.TempDir(), t.TempDir())

	mods, _ := os.ReadFile("/proc/modules")
	_, kvmErr := os.Stat("/dev/kvm")
	pvm := kvmErr == nil && strings.Contains(string(mods), "kvm_pvm ")
	hw := strings.Contains(string(mods), "kvm_intel ") || strings.Contains(string(mods), "kvm_amd ")
	kvm := find(cs, "kvm")
	switch {
	case pvm && !hw:
		if kvm.Detail != "present but PVM-only: guests will run under QEMU TCG" || kvm.Status != Warn {
			t.Errorf("host has kvm_pvm only; doctor says %+v", kvm)
		}
	case hw:
		if kvm.Status != OK {
			t.Errorf("host has hardware KVM; doctor says %+v", kvm)
		}
	case kvmErr != nil:
		if kvm.Status != Warn || !strings.Contains(kvm.Detail, "absent") {
			t.Errorf("host has no /dev/kvm; doctor says %+v", kvm)
		}
	}

	_, dmErr := os.Stat("/dev/mapper/control")
	dm := find(cs, "device-mapper")
	if dmErr != nil {
		if dm.Status != Warn || !strings.Contains(dm.Detail, "absent") {
			t.Errorf("host has no /dev/mapper/control; doctor says %+v", dm)
		}
	} else if dm.Status != OK {
		t.Errorf("host has device-mapper; doctor says %+v", dm)
	}

	if _, err := exec.LookPath("mkfs.ext4"); err == nil {
		if c := find(cs, "e2fsprogs"); c.Status != OK {
			t.Errorf("mkfs.ext4 is installed; doctor says %+v", c)
		}
	}
}

func TestKVMClassification(t *testing.T) {
	tests := []struct {
		name    string
		kvm     bool
		cpu     string
		modules string
		want    KVMState
	}{
		{"absent", false, "flags : fpu vmx\n", "kvm_intel 1 0\n", KVMAbsent},
		{"pvm only", true, "flags : fpu sse\n", "kvm_pvm 1 0\nkvm 2 1\n", KVMPVMOnly},
		{"intel", true, "flags : fpu vmx sse\n", "kvm_intel 1 0\nkvm 2 1\n", KVMHardware},
		{"amd", true, "flags : fpu svm\n", "kvm_amd 1 0\n", KVMHardware},
		{"flag but no module", true, "flags : vmx\n", "kvm 1 0\n", KVMNoVirt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			must := func(p, s string) {
				if err := os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(root, p), []byte(s), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if tc.kvm {
				must("dev/kvm", "")
			}
			must("proc/cpuinfo", tc.cpu)
			must("proc/modules", tc.modules)
			got, detail := Host{Root: root}.KVM()
			if got != tc.want {
				t.Fatalf("KVM() = %s (%s), want %s", got, detail, tc.want)
			}
		})
	}
}

func TestRequiredFailureMakesFailed(t *testing.T) {
	root := t.TempDir()
	h := Host{
		Root:     root,
		LookPath: func(string) (string, error) { return "", exec.ErrNotFound },
		Run:      func(context.Context, string, ...string) (string, error) { return "", nil },
	}
	cs := Run(context.Background(), h, t.TempDir(), t.TempDir())
	if !Failed(cs) {
		t.Fatal("no mkfs.ext4, no debugfs, no VMM, no /dev/net/tun: Failed() = false")
	}
	for _, name := range []string{"e2fsprogs", "debugfs", "vmm", "tun"} {
		if c := find(cs, name); c.Status != Fail || c.Fix == "" {
			t.Errorf("check %s = %+v, want a failure with a fix", name, c)
		}
	}
}
