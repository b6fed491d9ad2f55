package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
)

// ---- images ----

func (d *Daemon) handleImageList(w http.ResponseWriter, r *http.Request) {
	imgs, err := d.store.ListImages()
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].Name < imgs[j].Name })
	if imgs == nil {
		imgs = []model.Image{}
	}
	writeJSON(w, http.StatusOK, imgs)
}

func (d *Daemon) handleImageGet(w http.ResponseWriter, r *http.Request) {
	img, err := d.store.GetImage(r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

func (d *Daemon) handleImageDelete(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	caller := CallerFrom(r.Context())
	if !caller.Root() {
		d.writeError(w, r, api.Errorf(api.CodeForbidden, "removing image %q needs root: images are shared by every user of this host", name))
		return
	}
	img, err := d.store.GetImage(name)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	vms, err := d.store.ListVMs(nil)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	var users []string
	for _, vm := range vms {
		if vm.ImageID == img.ID {
			users = append(users, vm.Name)
		}
	}
	if len(users) > 0 && r.URL.Query().Get("force") != "true" {
		d.writeError(w, r, api.Errorf(api.CodeConflict, "image %q is used by VM(s) %s: remove them first", name, strings.Join(users, ", ")))
		return
	}
	freed := dirSize(img.Dir)
	if err := d.store.DeleteImage(img.Name); err != nil {
		d.writeError(w, r, err)
		return
	}
	if err := d.removeUnder(d.cfg.ImagesDir(), img.Dir); err != nil {
		d.log.Error("remove image dir", "image", img.Name, "dir", img.Dir, "err", err)
	}
	d.log.Info("image removed", "image", img.Name, "freed", freed)
	writeJSON(w, http.StatusOK, api.DeleteResult{Deleted: img.Name, Freed: freed})
}

// ---- kernels ----

func (d *Daemon) handleKernelList(w http.ResponseWriter, r *http.Request) {
	ks, err := d.store.ListKernels()
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	sort.Slice(ks, func(i, j int) bool { return ks[i].Name < ks[j].Name })
	if ks == nil {
		ks = []model.Kernel{}
	}
	writeJSON(w, http.StatusOK, ks)
}

func (d *Daemon) handleKernelGet(w http.ResponseWriter, r *http.Request) {
	k, err := d.store.GetKernel(r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, k)
}

func (d *Daemon) handleKernelDelete(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if !CallerFrom(r.Context()).Root() {
		d.writeError(w, r, api.Errorf(api.CodeForbidden, "removing kernel %q needs root: kernels are shared by every user of this host", name))
		return
	}
	k, err := d.store.GetKernel(name)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	var users []string
	imgs, err := d.store.ListImages()
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	for _, img := range imgs {
		if img.Kernel == k.Name {
			users = append(users, "image "+img.Name)
		}
	}
	vms, err := d.store.ListVMs(nil)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	for _, vm := range vms {
		if vm.Kernel == k.Name {
			users = append(users, "vm "+vm.Name)
		}
	}
	if len(users) > 0 && r.URL.Query().Get("force") != "true" {
		d.writeError(w, r, api.Errorf(api.CodeConflict, "kernel %q is used by %s: remove them first or pass --force", name, strings.Join(users, ", ")))
		return
	}
	freed := dirSize(k.Dir)
	if err := d.store.DeleteKernel(k.Name); err != nil {
		d.writeError(w, r, err)
		return
	}
	if err := d.removeUnder(d.cfg.KernelsDir(), k.Dir); err != nil {
		d.log.Error("remove kernel dir", "kernel", k.Name, "dir", k.Dir, "err", err)
	}
	writeJSON(w, http.StatusOK, api.DeleteResult{Deleted: k.Name, Freed: freed})
}

// ---- VMs ----

// visibleVM returns the VM if the caller may see it. Another user's VM is
// reported as not found, so that its existence does not leak.
func (d *Daemon) visibleVM(r *http.Request, name string) (model.VM, error) {
	vm, err := d.store.GetVM(name)
	if err != nil {
		return vm, err
	}
	c := CallerFrom(r.Context())
	if !c.Root() && vm.OwnerUID != c.UID {
		return model.VM{}, fmt.Errorf("vm %q: %w", name, store.ErrNotFound)
	}
	return vm, nil
}

func (d *Daemon) handleVMList(w http.ResponseWriter, r *http.Request) {
	c := CallerFrom(r.Context())
	var owner *uint32
	if !c.Root() {
		owner = &c.UID
	}
	sums, err := d.store.VMSummaries(owner)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	// The summaries are stored as compact JSON: join them as they are,
	// without decoding or re-encoding them.
	var buf bytes.Buffer
	buf.WriteByte('[')
	for i, raw := range sums {
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.Write(raw)
	}
	buf.WriteString("]\n")
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(buf.Bytes())
}

func (d *Daemon) handleVMGet(w http.ResponseWriter, r *http.Request) {
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d.withGuestState(r.Context(), vm))
}

// ---- helpers ----

// removeUnder removes path recursively, but only when it is strictly inside
// root: a corrupt record can never make the daemon delete anything else.
func (d *Daemon) removeUnder(root, path string) error {
	if path == "" {
		return nil
	}
	rel, err := filepath.Rel(root, filepath.Clean(path))
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") || filepath.IsAbs(rel) {
		return fmt.Errorf("refusing to remove %q: not inside %s", path, root)
	}
	if err := os.RemoveAll(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// dirSize returns the bytes allocated to the files under dir.
func dirSize(dir string) int64 {
	var n int64
	_ = filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += allocated(fi)
		}
		return nil
	})
	return n
}
