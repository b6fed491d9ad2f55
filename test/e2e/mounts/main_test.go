// Package mounts holds the end-to-end tests of host folders (vm create|run
// --mount) through the daemon, as an unprivileged caller: a real second
// uid through the socket.
package mounts

import (
	"testing"

	"github.com/bangerdev/banger/test/e2e/e2etest"
)

func TestMain(m *testing.M) { e2etest.Main(m) }
