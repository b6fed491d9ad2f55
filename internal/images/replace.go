package images

import (
	"fmt"
	"log/slog"

	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/subpath"
)

// retireReplaced deals with the image a pull --force has just replaced.
// When no VM uses it, its files go. When VMs do, it stays, under the name
// "<name>.replaced-<id>" (image ls shows it; root removes it with image rm
// once its VMs are gone): those VMs keep their image record, and with it
// their kernel triple and, for dm-snapshot disks, their origin, so they go
// on booting what they were made from.
func (s *Service) retireReplaced(old model.Image, report progress.Func, log *slog.Logger) {
	users, err := s.vmsOfImage(old.ID)
	if err != nil {
		// Unsure who uses it: keep it rather than break a VM.
		log.Error("list the VMs of a replaced image; keeping it", "err", err)
		users = []string{"(unknown)"}
	}
	if len(users) == 0 {
		if err := subpath.RemoveAll(s.cfg.ImagesDir(), old.Dir); err != nil {
			log.Error("remove replaced image", "dir", old.Dir, "err", err)
		}
		return
	}
	base := old.Name
	if len(base) > model.MaxNameLen-18 {
		base = base[:model.MaxNameLen-18]
	}
	old.Name = base + ".replaced-" + old.ID[:8]
	if _, err := s.store.PutImage(old, false); err != nil {
		log.Error("keep replaced image for its VMs", "image", old.Name, "err", err)
		return
	}
	log.Info("kept the replaced image for the VMs that use it", "image", old.Name, "vms", users)
	report.Report(progress.Event{Phase: "publish", Message: fmt.Sprintf("the replaced image is kept as %q for %d VM(s) made from it", old.Name, len(users))})
}

// vmsOfImage names the VMs made from the image with the given id.
func (s *Service) vmsOfImage(id string) ([]string, error) {
	vms, err := s.store.ListVMs(nil)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, v := range vms {
		if v.ImageID == id {
			names = append(names, v.Name)
		}
	}
	return names, nil
}
