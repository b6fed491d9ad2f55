// Package kvm tells whether this host offers hardware virtualization to VM
// monitors. It is a leaf: both the monitor backends (package vmm) and the
// test tier gates (package testutil) ask it, so neither imports the other.
package kvm

import (
	"bytes"
	"os"
)

// Hardware reports whether /dev/kvm is backed by hardware virtualization (a
// vmx or svm CPU flag, and kvm_intel or kvm_amd loaded), and why not. A
// /dev/kvm that merely opens, such as one served by kvm_pvm, does not count:
// standard guest kernels hang under it.
func Hardware() (bool, string) {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return false, "/dev/kvm is absent"
	}
	cpuinfo, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false, "read /proc/cpuinfo: " + err.Error()
	}
	if !hasCPUFlag(cpuinfo, "vmx") && !hasCPUFlag(cpuinfo, "svm") {
		return false, "the CPU exposes no vmx/svm flag"
	}
	for _, mod := range []string{"kvm_intel", "kvm_amd"} {
		if _, err := os.Stat("/sys/module/" + mod); err == nil {
			return true, ""
		}
	}
	return false, "neither kvm_intel nor kvm_amd is loaded"
}

func hasCPUFlag(cpuinfo []byte, flag string) bool {
	for _, line := range bytes.Split(cpuinfo, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte("flags")) {
			continue
		}
		_, rest, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		for _, f := range bytes.Fields(rest) {
			if string(f) == flag {
				return true
			}
		}
	}
	return false
}
