package kernels_test

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/bangerdev/banger/internal/kernels"
	"github.com/bangerdev/banger/internal/testutil"
)

func TestDetectFormatReal(t *testing.T) {
	k := debianKernel(t)
	format, version, err := kernels.DetectFormat(k.Kernel.Path)
	if err != nil || format != kernels.FormatBzImage || version != k.Version {
		t.Fatalf("DetectFormat(Debian vmlinuz) = %q, %q, %v; want bzImage, %q", format, version, err, k.Version)
	}

	// The real vmlinux inside it: the bzImage payload is LZ4 (legacy frame).
	testutil.RequiresTool(t, "lz4")
	data, err := os.ReadFile(k.Kernel.Path)
	if err != nil {
		t.Fatal(err)
	}
	setup := (int(data[0x1f1]) + 1) * 512
	off := binary.LittleEndian.Uint32(data[0x248:])
	n := binary.LittleEndian.Uint32(data[0x24c:])
	payload := data[setup+int(off) : setup+int(off)+int(n)]
	if !bytes.HasPrefix(payload, []byte{0x02, 0x21, 0x4c, 0x18}) {
		testutil.Missing(t, testutil.TierHost, fmt.Sprintf("payload is not LZ4 legacy (magic % x); this test only unpacks LZ4", payload[:4]))
	}
	vmlinux := filepath.Join(t.TempDir(), "vmlinux")
	cmd := exec.Command("lz4", "-dc")
	cmd.Stdin = bytes.NewReader(payload)
	out, _ := cmd.Output() // lz4 complains about the trailing size word; the output is complete
	if err := os.WriteFile(vmlinux, out, 0o644); err != nil {
		t.Fatal(err)
	}
	format, version, err = kernels.DetectFormat(vmlinux)
	if err != nil || format != kernels.FormatVmlinux || version != k.Version {
		t.Fatalf("DetectFormat(vmlinux from the Debian bzImage) = %q, %q, %v; want vmlinux, %q", format, version, err, k.Version)
	}
}

func TestDetectFormatCorrupt(t *testing.T) {
	k := debianKernel(t)
	real, err := os.ReadFile(k.Kernel.Path)
	if err != nil {
		t.Fatal(err)
	}
	random := make([]byte, 1<<20)
	if _, err := rand.Read(random); err != nil {
		t.Fatal(err)
	}
	self, err := os.ReadFile("/proc/self/exe") // an x86_64 ELF, but not a kernel (ET_EXEC or ET_DYN, no banner)
	if err != nil {
		t.Fatal(err)
	}
	aarch64 := append([]byte(nil), self...)
	binary.LittleEndian.PutUint16(aarch64[18:], 183) // e_machine = EM_AARCH64
	elf32 := append([]byte(nil), self...)
	elf32[4] = 1 // EI_CLASS = ELFCLASS32
	noFlag := append([]byte(nil), real...)
	noFlag[0x1fe] = 0
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"truncated bzImage (64 KiB)", real[:64<<10]},
		{"truncated bzImage (header only)", real[:0x240]},
		{"bzImage without boot flag", noFlag},
		{"random bytes", random},
		{"text", []byte("#!/bin/sh\necho not a kernel\n")},
		{"ELF for aarch64", aarch64},
		{"ELF32 header on x86_64 bytes", elf32},
		{"ELF magic only", []byte("\x7fELF")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "k")
			if err := os.WriteFile(p, tc.data, 0o644); err != nil {
				t.Fatal(err)
			}
			format, version, err := kernels.DetectFormat(p)
			if !errors.Is(err, kernels.ErrUnknownFormat) {
				t.Fatalf("DetectFormat(%s) = %q, %q, %v; want ErrUnknownFormat", tc.name, format, version, err)
			}
		})
	}
	// The test binary itself: an x86_64 ELF executable, but no kernel (no
	// linux_banner).
	p := filepath.Join(t.TempDir(), "self")
	if err := os.WriteFile(p, self, 0o644); err != nil {
		t.Fatal(err)
	}
	if f, v, err := kernels.DetectFormat(p); !errors.Is(err, kernels.ErrUnknownFormat) {
		t.Errorf("DetectFormat(test binary) = %q, %q, %v; want ErrUnknownFormat", f, v, err)
	}
	// A directory.
	if _, _, err := kernels.DetectFormat(t.TempDir()); !errors.Is(err, kernels.ErrUnknownFormat) {
		t.Errorf("DetectFormat(dir) err = %v", err)
	}
}
