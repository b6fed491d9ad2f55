package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/store"
)

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
	writeJSON(w, http.StatusOK, api.ViewOf(d.life.GuestState(r.Context(), vm), CallerFrom(r.Context()).Root()))
}

// vmOp runs a VM operation for the stream of request r and answers the
// VM's view for the caller.
func vmOp(r *http.Request, op func() (model.VM, error)) (any, error) {
	vm, err := op()
	if err != nil {
		return nil, err
	}
	return api.ViewOf(vm, CallerFrom(r.Context()).Root()), nil
}

func (d *Daemon) handleVMCreate(w http.ResponseWriter, r *http.Request) {
	var req api.CreateVMRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	caller := CallerFrom(r.Context())
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return vmOp(r, func() (model.VM, error) {
			vm, err := d.life.Create(ctx, req, caller.UID, report)
			if err != nil || !req.Start {
				return vm, err
			}
			return d.life.Start(ctx, vm.ID, "", req.Wait, report)
		})
	})
}

// startRequest reads the body of a start or restart and the VM it names,
// answering the error itself when there is one.
func (d *Daemon) startRequest(w http.ResponseWriter, r *http.Request) (api.StartVMRequest, model.VM, bool) {
	var req api.StartVMRequest
	if r.ContentLength != 0 {
		if err := decodeBody(r, &req); err != nil {
			d.writeError(w, r, err)
			return req, model.VM{}, false
		}
	}
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return req, vm, false
	}
	if req.SSHKey != "" {
		if _, _, err := agent.ParseAuthorizedKeyLine(req.SSHKey); err != nil {
			d.writeError(w, r, api.Errorf(api.CodeInvalid, "ssh key: %v", err))
			return req, vm, false
		}
	}
	return req, vm, true
}

func (d *Daemon) handleVMStart(w http.ResponseWriter, r *http.Request) {
	req, vm, ok := d.startRequest(w, r)
	if !ok {
		return
	}
	if req.FromSnapshot != "" {
		d.startFromSnapshot(w, r, vm, req) // snapshots.go
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return vmOp(r, func() (model.VM, error) { return d.life.Start(ctx, vm.ID, req.SSHKey, req.Wait, report) })
	})
}

func (d *Daemon) handleVMStop(w http.ResponseWriter, r *http.Request) {
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return vmOp(r, func() (model.VM, error) { return d.life.Stop(context.WithoutCancel(ctx), vm.ID, report) })
	})
}

func (d *Daemon) handleVMRestart(w http.ResponseWriter, r *http.Request) {
	req, vm, ok := d.startRequest(w, r)
	if !ok {
		return
	}
	d.stream(w, r, func(ctx context.Context, report progress.Func) (any, error) {
		return vmOp(r, func() (model.VM, error) {
			if vm, err := d.life.Stop(context.WithoutCancel(ctx), vm.ID, report); err != nil {
				return vm, err
			}
			return d.life.Start(ctx, vm.ID, req.SSHKey, req.Wait, report)
		})
	})
}

func (d *Daemon) handleVMDelete(w http.ResponseWriter, r *http.Request) {
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	force := r.URL.Query().Get("force") == "true"
	res, err := d.life.Delete(context.WithoutCancel(r.Context()), vm.ID, force)
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// handleVMLogs streams the VM's serial console log; with follow=true it
// keeps streaming new output until the client goes away.
func (d *Daemon) handleVMLogs(w http.ResponseWriter, r *http.Request) {
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	f, err := os.Open(d.life.ConsoleLog(vm.ID))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			d.writeError(w, r, api.Errorf(api.CodeNotFound, "VM %q has no console log yet: it has never been started", vm.Name))
			return
		}
		d.writeError(w, r, err)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	follow := r.URL.Query().Get("follow") == "true"
	buf := make([]byte, 32<<10)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			continue
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return
		}
		if !follow {
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}
