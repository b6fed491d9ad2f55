// Package lifecycle holds the end-to-end tests of a VM's life on QEMU:
// pull, run, ssh, stop, start, remove, two VMs at once, and failures.
package lifecycle

import (
	"testing"

	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }
