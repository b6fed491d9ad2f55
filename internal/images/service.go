// Package images is the image service: it pulls images (from an OCI
// registry, or the image catalog's fast path) and publishes them with their
// kernel staged beside them, lists the catalog, prunes the layer cache, and
// imports, pulls and resolves kernels. Its mechanisms live in imagepull,
// imagecat and kernels; this package orders them, records the results and
// removes whatever a failed or canceled operation made.
package images

import (
	"log/slog"
	"sync"

	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/imagepull"
	"github.com/bangerdev/banger/internal/store"
)

// Service is the image service.
type Service struct {
	cfg   config.Config
	store *store.Store
	log   *slog.Logger

	pulls     pulls
	refreshMu sync.Mutex // one refresh-agent at a time
	cacheOnce sync.Once
	cache     *imagepull.Cache
}

// New returns the image service over the store.
func New(cfg config.Config, st *store.Store, log *slog.Logger) *Service {
	if log == nil {
		log = slog.Default()
	}
	return &Service{cfg: cfg, store: st, log: log}
}
