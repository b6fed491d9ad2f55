package images

import (
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/subpath"
)

// RemoveImage removes an image's record and files. An image a VM uses is
// refused unless force.
func (s *Service) RemoveImage(name string, force bool) (api.DeleteResult, error) {
	img, err := s.store.GetImage(name)
	if err != nil {
		return api.DeleteResult{}, err
	}
	vms, err := s.store.ListVMs(nil)
	if err != nil {
		return api.DeleteResult{}, err
	}
	var users []string
	for _, vm := range vms {
		if vm.ImageID == img.ID {
			users = append(users, vm.Name)
		}
	}
	if len(users) > 0 && !force {
		return api.DeleteResult{}, api.Errorf(api.CodeConflict, "image %q is used by VM(s) %s: remove them first", name, strings.Join(users, ", "))
	}
	freed := subpath.DiskUsage(img.Dir)
	if err := s.store.DeleteImage(img.Name); err != nil {
		return api.DeleteResult{}, err
	}
	if err := subpath.RemoveAll(s.cfg.ImagesDir(), img.Dir); err != nil {
		s.log.Error("remove image dir", "image", img.Name, "dir", img.Dir, "err", err)
	}
	s.log.Info("image removed", "image", img.Name, "freed", freed)
	return api.DeleteResult{Deleted: img.Name, Freed: freed}, nil
}

// RemoveKernel removes a kernel's record and files. A kernel an image or a
// VM uses is refused unless force.
func (s *Service) RemoveKernel(name string, force bool) (api.DeleteResult, error) {
	k, err := s.store.GetKernel(name)
	if err != nil {
		return api.DeleteResult{}, err
	}
	var users []string
	imgs, err := s.store.ListImages()
	if err != nil {
		return api.DeleteResult{}, err
	}
	for _, img := range imgs {
		if img.Kernel == k.Name {
			users = append(users, "image "+img.Name)
		}
	}
	vms, err := s.store.ListVMs(nil)
	if err != nil {
		return api.DeleteResult{}, err
	}
	for _, vm := range vms {
		if vm.Kernel == k.Name {
			users = append(users, "vm "+vm.Name)
		}
	}
	if len(users) > 0 && !force {
		return api.DeleteResult{}, api.Errorf(api.CodeConflict, "kernel %q is used by %s: remove them first or pass --force", name, strings.Join(users, ", "))
	}
	freed := subpath.DiskUsage(k.Dir)
	if err := s.store.DeleteKernel(k.Name); err != nil {
		return api.DeleteResult{}, err
	}
	if err := subpath.RemoveAll(s.cfg.KernelsDir(), k.Dir); err != nil {
		s.log.Error("remove kernel dir", "kernel", k.Name, "dir", k.Dir, "err", err)
	}
	return api.DeleteResult{Deleted: k.Name, Freed: freed}, nil
}
