package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/store"
)

// invalid marks an error as the client's fault.
func invalid(format string, args ...any) error {
	return api.Errorf(api.CodeInvalid, format, args...)
}

// toAPIError classifies err for the wire.
func toAPIError(err error) *api.Error {
	var ae *api.Error
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, store.ErrNotFound):
		return &api.Error{Code: api.CodeNotFound, Message: err.Error()}
	case errors.Is(err, store.ErrConflict):
		return &api.Error{Code: api.CodeConflict, Message: err.Error()}
	case errors.Is(err, context.Canceled):
		return &api.Error{Code: api.CodeCanceled, Message: err.Error()}
	default:
		return &api.Error{Code: api.CodeInternal, Message: err.Error()}
	}
}

func statusOf(code api.ErrorCode) int {
	switch code {
	case api.CodeNotFound:
		return http.StatusNotFound
	case api.CodeConflict:
		return http.StatusConflict
	case api.CodeInvalid:
		return http.StatusBadRequest
	case api.CodeForbidden:
		return http.StatusForbidden
	case api.CodeCanceled:
		return 499
	default:
		return http.StatusInternalServerError
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func (d *Daemon) writeError(w http.ResponseWriter, r *http.Request, err error) {
	ae := toAPIError(err)
	lvl := slog.LevelInfo
	if ae.Code == api.CodeInternal {
		lvl = slog.LevelError
	}
	d.log.Log(r.Context(), lvl, "request failed", "method", r.Method, "path", r.URL.Path, "code", ae.Code, "err", ae.Message)
	writeJSON(w, statusOf(ae.Code), ae)
}

// decodeBody reads a JSON request body into v, refusing unknown fields and
// bodies over 1 MiB.
func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return invalid("bad request body: %v", err)
	}
	return nil
}

// stream runs a long operation, sending its progress events as NDJSON and
// then its result or error. The operation's context ends when the client
// goes away, which cancels it.
func (d *Daemon) stream(w http.ResponseWriter, r *http.Request, op func(ctx context.Context, report progress.Func) (any, error)) {
	w.Header().Set("Content-Type", api.StreamContentType)
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	send := func(line api.StreamLine) {
		mu.Lock()
		defer mu.Unlock()
		if enc.Encode(line) == nil && flusher != nil {
			flusher.Flush()
		}
	}
	res, err := op(r.Context(), func(ev progress.Event) {
		send(api.StreamLine{Event: &ev})
	})
	if err != nil {
		ae := toAPIError(err)
		if r.Context().Err() != nil && ae.Code == api.CodeInternal {
			ae = &api.Error{Code: api.CodeCanceled, Message: fmt.Sprintf("canceled: %v", err)}
		}
		d.log.Info("operation failed", "path", r.URL.Path, "code", ae.Code, "err", ae.Message)
		send(api.StreamLine{Error: ae})
		return
	}
	raw, err := json.Marshal(res)
	if err != nil {
		send(api.StreamLine{Error: &api.Error{Code: api.CodeInternal, Message: err.Error()}})
		return
	}
	send(api.StreamLine{Result: raw})
}
