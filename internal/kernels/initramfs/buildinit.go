package initramfs

import (
	"context"
	"fmt"
	"os"
	"os/exec"
)

// InitPackage is the import path of the init program the initramfs carries.
const InitPackage = "github.com/bangerdev/banger/cmd/banger-init"

// BuildInit compiles cmd/banger-init as a static linux/amd64 binary at out
// with `go build` (CGO_ENABLED=0). It needs the Go toolchain and must run
// inside the banger module (tests and development; releases ship the binary
// next to banger).
func BuildInit(ctx context.Context, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, InitPackage)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", InitPackage, err, b)
	}
	return nil
}
