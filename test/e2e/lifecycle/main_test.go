// Package lifecycle holds the end-to-end tests of a VM's life on QEMU:
// pull, run, ssh, a file kept across stop and start, remove, nothing left.
package lifecycle

import (
	"testing"

	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }
