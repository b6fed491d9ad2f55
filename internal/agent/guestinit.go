package agent

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"strings"

	"github.com/bangerdev/banger/internal/guestabi"
)

// maxMainStateBytes bounds the main-process record the agent reads.
const maxMainStateBytes = 16 << 10

// initState reports which init runs the guest and, under banger's PID 1,
// the main process's state: from guestabi.InitFile and MainStateFile,
// which banger's PID 1 writes. Without InitFile the guest runs the image's
// own init.
func (s *Server) initState() (guestabi.Init, *guestabi.MainState) {
	b, err := readLimited(s.path(guestabi.InitFile), 64)
	if errors.Is(err, fs.ErrNotExist) {
		if _, err := os.Stat(s.path("/proc/1/comm")); err == nil {
			return guestabi.InitImage, nil // a guest's /proc is mounted
		}
		return "", nil
	}
	if err != nil {
		s.logf("read %s: %v", guestabi.InitFile, err)
		return "", nil
	}
	if guestabi.Init(strings.TrimSpace(string(b))) != guestabi.InitBanger {
		return guestabi.InitImage, nil
	}
	b, err = readLimited(s.path(guestabi.MainStateFile), maxMainStateBytes)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			s.logf("read %s: %v", guestabi.MainStateFile, err)
		}
		return guestabi.InitBanger, nil
	}
	var m guestabi.MainState
	if err := json.Unmarshal(b, &m); err != nil {
		s.logf("read %s: %v", guestabi.MainStateFile, err)
		return guestabi.InitBanger, nil
	}
	return guestabi.InitBanger, &m
}
