package guestinit

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Power-button modules: Debian's cloud kernel builds the ACPI button
// driver and evdev as modules. The image holds its kernel's modules tree
// (image pull stages it); images without one get no power button, and the
// agent's shutdown and Ctrl-Alt-Del still work.
var powerButtonModules = []string{"kernel/drivers/input/evdev.ko", "kernel/drivers/acpi/button.ko"}

// Linux input events (struct input_event on 64-bit: a timeval, type,
// code, value).
const (
	inputEventSize = 24
	evKey          = 1
	keyPower       = 116
)

// watchPowerButton powers the guest off when the ACPI power button is
// pressed (QEMU's system_powerdown, which banger's stop escalates to when
// the agent does not answer).
func (p *pid1) watchPowerButton() {
	var uts unix.Utsname
	if err := unix.Uname(&uts); err == nil {
		release := unix.ByteSliceToString(uts.Release[:])
		for _, m := range powerButtonModules {
			if err := loadModuleFile(filepath.Join("/lib/modules", release, m)); err != nil && !errors.Is(err, os.ErrNotExist) {
				p.failf("power button: load "+filepath.Base(m), err)
			}
		}
	}
	// devtmpfs makes the event node shortly after the driver binds.
	var dev string
	for i := 0; i < 50 && dev == ""; i++ {
		dev = powerButtonDevice()
		if dev == "" {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if dev == "" {
		return
	}
	f, err := os.Open(dev)
	if err != nil {
		p.failf("power button", err)
		return
	}
	defer f.Close()
	buf := make([]byte, inputEventSize)
	for {
		if _, err := f.Read(buf); err != nil {
			return
		}
		typ := binary.LittleEndian.Uint16(buf[16:])
		code := binary.LittleEndian.Uint16(buf[18:])
		value := int32(binary.LittleEndian.Uint32(buf[20:])) //nolint:gosec // the kernel's s32
		if typ == evKey && code == keyPower && value == 1 && p.stopping.CompareAndSwap(false, true) {
			go p.shutdown("ACPI power button")
			return
		}
	}
}

// powerButtonDevice is the /dev/input/eventN of the "Power Button" device.
func powerButtonDevice() string {
	names, _ := filepath.Glob("/sys/class/input/event*/device/name")
	for _, n := range names {
		b, err := os.ReadFile(n) //nolint:gosec // sysfs
		if err == nil && strings.TrimSpace(string(b)) == "Power Button" {
			return "/dev/input/" + filepath.Base(filepath.Dir(filepath.Dir(n)))
		}
	}
	return ""
}

// loadModuleFile loads an uncompressed module; one already loaded is fine.
func loadModuleFile(path string) error {
	f, err := os.Open(path) //nolint:gosec // the image's own modules tree
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	return nil
}
