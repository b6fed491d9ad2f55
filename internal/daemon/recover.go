package daemon

import (
	"context"
	"fmt"
)

// recovery is start-up recovery: the steps that run, in this order, after
// the store is open and before the daemon listens. Leftovers of interrupted
// pulls and imports go first; then VM records are reconciled with the host
// (adopting live monitors, releasing the rest); the orphan scan runs last,
// once every record says what it holds.
func (d *Daemon) recovery() []recoveryStep {
	return []recoveryStep{
		{"pull leftovers", d.img.RecoverPullLeftovers},
		{"kernel import leftovers", d.img.RecoverKernelLeftovers},
		{"VM reconcile", d.rec.VMs},
		{"snapshot leftovers", d.recoverSnapshots},
		{"orphan scan", d.rec.Orphans},
	}
}

// recoveryStep is one named step of start-up recovery.
type recoveryStep struct {
	name string
	run  func(ctx context.Context) error
}

func (d *Daemon) recover(ctx context.Context) error {
	for _, s := range d.recovery() {
		if err := s.run(ctx); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return nil
}
