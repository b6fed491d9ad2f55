// Command banger is the banger CLI, and with "banger daemon" the root daemon
// it talks to.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/termsafe"
)

// Exit codes, one per error class. They are part of the CLI contract
// (docs/cli.md).
const (
	exitOK          = 0
	exitInternal    = 1
	exitInvalid     = 2
	exitNotFound    = 3
	exitConflict    = 4
	exitUnavailable = 5
	exitForbidden   = 6
	exitCanceled    = 130
)

func exitCode(err error) int {
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	switch api.CodeOf(err) {
	case api.CodeNotFound:
		return exitNotFound
	case api.CodeConflict:
		return exitConflict
	case api.CodeInvalid:
		return exitInvalid
	case api.CodeUnavailable:
		return exitUnavailable
	case api.CodeForbidden:
		return exitForbidden
	case api.CodeCanceled:
		return exitCanceled
	}
	return exitInternal
}

// exitError carries an exit code without a message (the command printed
// what it had to say).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// errorLine is how the CLI prints an error. Errors may carry guest strings
// (a VM's error reason, a console tail), so terminal escapes in them are
// neutralized.
func errorLine(err error) string { return "banger: " + termsafe.String(err.Error()) }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd := newRootCmd()
	err := cmd.ExecuteContext(ctx)
	if err == nil {
		return
	}
	var ee exitError
	if !errors.As(err, &ee) {
		fmt.Fprintln(os.Stderr, errorLine(err))
	}
	os.Exit(exitCode(err))
}
