package daemon

import (
	"context"
	"net/http"
	"os"
	"sort"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
)

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
	if !CallerFrom(r.Context()).Root() {
		d.writeError(w, r, api.Errorf(api.CodeForbidden, "removing image %q needs root: images are shared by every user of this host", name))
		return
	}
	res, err := d.img.RemoveImage(name, r.URL.Query().Get("force") == "true")
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (d *Daemon) handleImagePull(w http.ResponseWriter, r *http.Request) {
	var req api.PullRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	caller := CallerFrom(r.Context())
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return d.img.Pull(ctx, req, caller.UID, report)
	})
}

func (d *Daemon) handleImageRefreshAgent(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	caller := CallerFrom(r.Context())
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return d.img.RefreshAgent(ctx, name, caller.UID, report)
	})
}

func (d *Daemon) handleImageCatalog(w http.ResponseWriter, r *http.Request) {
	list, err := d.img.Catalog(r.Context())
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, list)
}

func (d *Daemon) handleCachePrune(w http.ResponseWriter, r *http.Request) {
	if !CallerFrom(r.Context()).Root() {
		d.writeError(w, r, api.Errorf(api.CodeForbidden, "pruning the layer cache needs root"))
		return
	}
	res, err := d.img.PruneCache(r.Context())
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

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
	res, err := d.img.RemoveKernel(name, r.URL.Query().Get("force") == "true")
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// handleKernelImport imports a kernel whose files the CLI uploads as a tar
// stream (see images.Service.ReceiveUpload).
func (d *Daemon) handleKernelImport(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	name, force := q.Get("name"), q.Get("force") == "true"
	if err := model.ValidateName("kernel", name); err != nil {
		d.writeError(w, r, api.Errorf(api.CodeInvalid, "%v", err))
		return
	}
	if !CallerFrom(r.Context()).Root() {
		d.writeError(w, r, api.Errorf(api.CodeForbidden, "importing kernels needs root: kernels are shared by every user of this host"))
		return
	}
	if err := d.img.CheckKernelImport(name, force); err != nil {
		d.writeError(w, r, err)
		return
	}
	// HTTP/1 handlers must read the body before they answer.
	upload, err := d.img.ReceiveUpload(r.Body)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	defer os.RemoveAll(upload)
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return d.img.ImportKernel(ctx, name, upload, force, report)
	})
}

// handleKernelPull downloads a kernel catalog entry, verifies it and
// records it.
func (d *Daemon) handleKernelPull(w http.ResponseWriter, r *http.Request) {
	var req api.KernelPullRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	if err := model.ValidateName("kernel", req.Name); err != nil {
		d.writeError(w, r, api.Errorf(api.CodeInvalid, "%v", err))
		return
	}
	if !CallerFrom(r.Context()).Root() {
		d.writeError(w, r, api.Errorf(api.CodeForbidden, "pulling kernels needs root: kernels are shared by every user of this host"))
		return
	}
	if err := d.img.CheckKernelPull(req); err != nil {
		d.writeError(w, r, err)
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return d.img.PullKernel(ctx, req, report)
	})
}
