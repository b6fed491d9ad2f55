package main

import (
	"fmt"
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/spf13/cobra"
)

// rejectUnknownSubcommands makes every command group under root (vm, image,
// kernel, image cache, ...) answer an unknown or mistyped subcommand with
// "unknown command" and an invalid-input exit status, as the root command
// does, instead of printing its help and exiting 0: a script's typo must
// not read as success. A group run without arguments still prints its help.
func rejectUnknownSubcommands(root *cobra.Command) {
	for _, c := range root.Commands() {
		if !c.HasSubCommands() {
			continue
		}
		if !c.Runnable() {
			c.Args = unknownSubcommand
			c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
		}
		rejectUnknownSubcommands(c)
	}
}

// unknownSubcommand refuses any positional argument of a command group: the
// argument names no subcommand of it.
func unknownSubcommand(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
	if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return api.Errorf(api.CodeInvalid, "%s (banger %s --help lists its commands)", msg, strings.TrimPrefix(cmd.CommandPath(), "banger "))
}
