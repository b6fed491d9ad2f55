// Package kernels manages the kernels banger boots guests with: it detects
// kernel image formats, imports kernels from files and from Debian/Ubuntu
// linux-image packages (generating an initramfs for them), resolves a
// kernel reference against the local store and the kernel catalog, and
// stages the kernel triple (kernel, initrd, modules) beside an image.
//
// On-disk layout of one kernel directory (the dstDir given to the import and
// pull functions, normally <state>/kernels/<name>):
//
//	kernel              the kernel image (bzImage or ELF vmlinux)
//	initrd              the initramfs, when there is one
//	modules/<version>/  the lib/modules/<version> tree, depmod'ed
//
// Every function here that builds such a directory builds it in a sibling
// "<dstDir>.staging-*" directory, fsyncs it and renames it into place, so a
// crash leaves either nothing or a staging directory that RemoveStale can
// delete, never a half-written kernel.
package kernels

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// Kernel image formats DetectFormat reports.
const (
	FormatBzImage = "bzImage"
	FormatVmlinux = "vmlinux"
)

// ErrUnknownFormat is returned when a file is not an x86_64 bzImage or ELF
// vmlinux, or is truncated or corrupt.
var ErrUnknownFormat = errors.New("not a usable x86_64 kernel image (want a bzImage or an ELF64 x86_64 vmlinux)")

// Offsets in the x86 boot protocol's setup header (Documentation/arch/x86/boot.rst).
const (
	offSetupSects  = 0x1F1
	offSysSize     = 0x1F4
	offBootFlag    = 0x1FE
	offHeaderMagic = 0x202
	offProtocol    = 0x206
	offKernelVer   = 0x20E
	offXLoadFlags  = 0x236
	setupHdrEnd    = 0x268
	xlfKernel64    = 1 << 0
)

// DetectFormat reports whether the file at path is a bzImage or an ELF
// vmlinux for x86_64, and the kernel release it carries (for a bzImage ""
// when its header does not say; a vmlinux must carry the linux_banner). Anything else, including a truncated image, gives an error
// wrapping ErrUnknownFormat.
func DetectFormat(path string) (format, version string, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", "", fmt.Errorf("detect kernel format of %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", "", fmt.Errorf("detect kernel format of %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return "", "", fmt.Errorf("detect kernel format of %s: not a regular file: %w", path, ErrUnknownFormat)
	}
	head := make([]byte, setupHdrEnd)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return "", "", fmt.Errorf("detect kernel format of %s: %w", path, err)
	}
	head = head[:n]
	switch {
	case len(head) >= 4 && bytes.Equal(head[:4], []byte(elf.ELFMAG)):
		version, err = detectVmlinux(f)
		if err != nil {
			return "", "", fmt.Errorf("detect kernel format of %s: %w", path, err)
		}
		return FormatVmlinux, version, nil
	case len(head) >= offHeaderMagic+4 && string(head[offHeaderMagic:offHeaderMagic+4]) == "HdrS":
		version, err = detectBzImage(f, head, st.Size())
		if err != nil {
			return "", "", fmt.Errorf("detect kernel format of %s: %w", path, err)
		}
		return FormatBzImage, version, nil
	}
	return "", "", fmt.Errorf("detect kernel format of %s: no ELF magic and no \"HdrS\" setup header at 0x202: %w", path, ErrUnknownFormat)
}

func detectBzImage(f io.ReaderAt, head []byte, size int64) (string, error) {
	if len(head) < setupHdrEnd {
		return "", fmt.Errorf("setup header truncated at %d bytes: %w", len(head), ErrUnknownFormat)
	}
	if binary.LittleEndian.Uint16(head[offBootFlag:]) != 0xAA55 {
		return "", fmt.Errorf("boot flag at 0x1fe is not 0xaa55: %w", ErrUnknownFormat)
	}
	proto := binary.LittleEndian.Uint16(head[offProtocol:])
	if proto < 0x0200 {
		return "", fmt.Errorf("boot protocol %#x is older than 2.00: %w", proto, ErrUnknownFormat)
	}
	if proto >= 0x020c && head[offXLoadFlags]&xlfKernel64 == 0 {
		return "", fmt.Errorf("bzImage is not a 64-bit kernel (XLF_KERNEL_64 clear): %w", ErrUnknownFormat)
	}
	setupSects := int64(head[offSetupSects])
	if setupSects == 0 {
		setupSects = 4
	}
	sysSize := int64(binary.LittleEndian.Uint32(head[offSysSize:])) * 16
	if want := (setupSects+1)*512 + sysSize; size < want {
		return "", fmt.Errorf("bzImage truncated: %d bytes, the header promises %d: %w", size, want, ErrUnknownFormat)
	}
	ptr := int64(binary.LittleEndian.Uint16(head[offKernelVer:]))
	if ptr == 0 {
		return "", nil
	}
	buf := make([]byte, 256)
	n, err := f.ReadAt(buf, ptr+0x200)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read kernel_version string: %w", err)
	}
	buf = buf[:n]
	if i := bytes.IndexByte(buf, 0); i >= 0 {
		buf = buf[:i]
	}
	return firstField(string(buf)), nil
}

func detectVmlinux(f *os.File) (string, error) {
	ef, err := elf.NewFile(f)
	if err != nil {
		return "", fmt.Errorf("parse ELF: %w: %w", err, ErrUnknownFormat)
	}
	if ef.Class != elf.ELFCLASS64 || ef.Machine != elf.EM_X86_64 {
		return "", fmt.Errorf("ELF is %v %v, not ELFCLASS64 x86_64: %w", ef.Class, ef.Machine, ErrUnknownFormat)
	}
	if ef.Type != elf.ET_EXEC {
		return "", fmt.Errorf("ELF type is %v, a kernel is ET_EXEC: %w", ef.Type, ErrUnknownFormat)
	}
	// The linux_banner string, "Linux version <release> (...)", lives in .rodata.
	var r io.Reader
	if s := ef.Section(".rodata"); s != nil && s.Type != elf.SHT_NOBITS {
		r = s.Open()
	} else {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return "", err
		}
		r = f
	}
	v, err := scanBanner(r)
	if err != nil {
		return "", err
	}
	if v == "" {
		return "", fmt.Errorf("x86_64 ELF executable without a \"Linux version\" banner, not a kernel: %w", ErrUnknownFormat)
	}
	return v, nil
}

// scanBanner finds "Linux version X" in r and returns X, or "" if absent.
func scanBanner(r io.Reader) (string, error) {
	const marker = "Linux version "
	br := bufio.NewReaderSize(r, 1<<20)
	var carry []byte
	buf := make([]byte, 1<<20)
	for {
		n, err := br.Read(buf)
		chunk := append(carry, buf[:n]...) //nolint:gocritic // carry is a fresh slice each round
		for off := 0; ; {
			i := bytes.Index(chunk[off:], []byte(marker))
			if i < 0 {
				break
			}
			rest := chunk[off+i+len(marker):]
			end := bytes.IndexAny(rest, " \x00\n")
			if end > 0 && rest[0] != '%' {
				return string(rest[:end]), nil
			}
			if end < 0 && err == nil {
				break // the release runs past this chunk; keep it in carry
			}
			off += i + len(marker)
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return "", nil
			}
			return "", fmt.Errorf("scan for linux_banner: %w", err)
		}
		keep := 256
		if len(chunk) < keep {
			keep = len(chunk)
		}
		carry = append([]byte(nil), chunk[len(chunk)-keep:]...)
	}
}

func firstField(s string) string {
	fields := strings.Fields(s)
	if len(fields) == 0 {
		return ""
	}
	return fields[0]
}
