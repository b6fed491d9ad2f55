package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
)

// groups returns every command of the tree under c that has subcommands,
// the root included.
func groups(c *cobra.Command) []*cobra.Command {
	var out []*cobra.Command
	if c.HasSubCommands() {
		out = append(out, c)
	}
	for _, s := range c.Commands() {
		out = append(out, groups(s)...)
	}
	return out
}

// TestUnknownSubcommandFails runs an unknown and a mistyped subcommand
// under every command group: each must fail with "unknown command" and a
// non-zero exit status, never print the help and exit 0.
func TestUnknownSubcommandFails(t *testing.T) {
	all := groups(newRootCmd())
	if len(all) < 5 {
		t.Fatalf("found %d command groups, want at least root, vm, image, image cache and kernel", len(all))
	}
	for _, grp := range all {
		path := strings.Fields(grp.CommandPath())[1:]
		for _, bad := range []string{"snapshot-nope", "lss"} {
			args := append(append([]string{"--socket", "/nonexistent/banger.sock"}, path...), bad, "x", "y")
			t.Run(strings.Join(append(path, bad), "_"), func(t *testing.T) {
				cmd := newRootCmd()
				var out, errb bytes.Buffer
				cmd.SetOut(&out)
				cmd.SetErr(&errb)
				cmd.SetArgs(args)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				err := cmd.ExecuteContext(ctx)
				if err == nil || !strings.Contains(err.Error(), "unknown command") {
					t.Fatalf("banger %s: err %v (stdout %q), want an unknown command error", strings.Join(args[2:], " "), err, out.String())
				}
				if code := exitCode(err); code == exitOK {
					t.Fatalf("banger %s: exit status 0, want non-zero", strings.Join(args[2:], " "))
				}
			})
		}
	}
}

// TestGroupWithoutArgsPrintsHelp checks that a bare group still shows its
// help and succeeds.
func TestGroupWithoutArgsPrintsHelp(t *testing.T) {
	for _, name := range []string{"vm", "image", "kernel"} {
		cmd := newRootCmd()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs([]string{name})
		if err := cmd.Execute(); err != nil {
			t.Fatalf("banger %s: %v, want its help", name, err)
		}
		if !strings.Contains(out.String(), "Available Commands") {
			t.Fatalf("banger %s printed %q, want its help", name, out.String())
		}
	}
}
