package daemon

import (
	"context"
)

// recoverers run at start-up, in order, after the store is open. Later
// capabilities (image staging cleanup, VM reconcile) add theirs.
var recoverers []func(ctx context.Context, d *Daemon) error

func (d *Daemon) recover(ctx context.Context) error {
	for _, r := range recoverers {
		if err := r(ctx, d); err != nil {
			return err
		}
	}
	return nil
}
