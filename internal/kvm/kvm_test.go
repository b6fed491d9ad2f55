package kvm

import "testing"

func TestHasCPUFlag(t *testing.T) {
	cpuinfo := []byte("processor\t: 0\nflags\t\t: fpu vme de pse vmx sse\nbugs\t\t: svm_bug\n")
	for _, tc := range []struct {
		flag string
		want bool
	}{{"vmx", true}, {"fpu", true}, {"svm", false}, {"vm", false}, {"svm_bug", false}} {
		if got := hasCPUFlag(cpuinfo, tc.flag); got != tc.want {
			t.Errorf("hasCPUFlag(%q) = %v, want %v", tc.flag, got, tc.want)
		}
	}
}

// TestHardwareAnswersWithAReason checks that a host without hardware
// virtualization (like the CI machines) is told why.
func TestHardwareAnswersWithAReason(t *testing.T) {
	ok, why := Hardware()
	if !ok && why == "" {
		t.Fatal("Hardware() = false with no reason")
	}
	if ok && why != "" {
		t.Fatalf("Hardware() = true with reason %q", why)
	}
}
