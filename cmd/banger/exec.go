package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// exitAgentLost is the exit status when the connection to the guest agent
// ends before the remote command does (as ssh uses 255).
const exitAgentLost = 255

func newExecCmd(g *globals) *cobra.Command {
	var req api.ExecRequest
	var interactive, tty bool
	cmd := &cobra.Command{
		Use:   "exec VM [-i] [-t] [-u USER] [-w DIR] [-e K=V]... -- COMMAND [ARGS...]",
		Short: "Run a command in a running VM through its guest agent (no sshd or network needed)",
		Long: "Run a command in a running VM over the guest agent's channel, in the manner of docker exec.\n" +
			"Its output is streamed, its exit status is banger's (128+N when signal N killed it, 127 when the\n" +
			"command is not found). Ctrl-C and Ctrl-\\ reach it as signals; -t gives it a terminal whose size\n" +
			"follows yours. If the connection to the agent is lost, banger exits with 255.",
		Example: "  banger exec dev -- uname -a\n  banger exec -it dev -- bash\n  tar c . | banger exec -i dev -- tar x -C /srv",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 1 && args[1] == "--" {
				args = args[1:]
			}
			if len(args) < 2 {
				return api.Errorf(api.CodeInvalid, "expected a VM name and a command: banger exec VM -- COMMAND [ARGS...]")
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			argv := args[1:]
			if argv[0] == "--" { // flags stop at the VM name; "--" is optional
				argv = argv[1:]
			}
			req.Argv, req.Stdin, req.TTY = argv, interactive, tty
			for _, kv := range req.Env {
				if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
					return api.Errorf(api.CodeInvalid, "-e %q: want KEY=VALUE", kv)
				}
			}
			code, err := runExec(c.Context(), g, args[0], req)
			if err != nil {
				return err
			}
			if code != 0 {
				return exitError{code: code}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.SetInterspersed(false)
	f.BoolVarP(&interactive, "interactive", "i", false, "keep the command's standard input open and send yours")
	f.BoolVarP(&tty, "tty", "t", false, "give the command a terminal")
	f.StringVarP(&req.User, "user", "u", "", "guest user name or uid to run as (default root)")
	f.StringVarP(&req.Dir, "workdir", "w", "", "working directory in the guest (default the user's home)")
	f.StringArrayVarP(&req.Env, "env", "e", nil, "set an environment variable KEY=VALUE (repeatable)")
	return cmd
}

// runExec runs req in VM name and returns the remote exit status.
func runExec(ctx context.Context, g *globals, name string, req api.ExecRequest) (int, error) {
	stdinFd, stdoutFd := int(os.Stdin.Fd()), int(os.Stdout.Fd()) //nolint:gosec // small fds
	if req.TTY {
		sizeFd := stdoutFd
		if !term.IsTerminal(sizeFd) {
			sizeFd = stdinFd
		}
		if cols, rows, err := term.GetSize(sizeFd); err == nil {
			req.Rows, req.Cols = clampSize(rows), clampSize(cols)
		}
		req.Term = os.Getenv("TERM")
	}
	conn, err := g.client().Upgrade(ctx, "/vms/"+url.PathEscape(name)+"/exec", req)
	if err != nil {
		return 0, err
	}
	// Signals go to the remote command; the CLI's own cancellation (the
	// first Ctrl-C) must not cut the stream.
	sctx := context.WithoutCancel(ctx)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGWINCH)
	defer signal.Stop(sigs)

	eio := agent.ExecIO{Stdout: os.Stdout, Stderr: os.Stderr}
	if g.out != os.Stdout {
		eio.Stdout, eio.Stderr = g.out, g.errOut
	}
	if req.Stdin {
		eio.Stdin = os.Stdin
	}
	if req.TTY && req.Stdin && term.IsTerminal(stdinFd) {
		old, err := term.MakeRaw(stdinFd)
		if err != nil {
			_ = conn.Close()
			return 0, fmt.Errorf("put the terminal in raw mode: %w", err)
		}
		defer func() { _ = term.Restore(stdinFd, old) }()
	}
	resize := make(chan agent.Winsize, 1)
	forward := make(chan syscall.Signal, 4)
	eio.Resize, eio.Signal = resize, forward
	quit := make(chan struct{})
	defer close(quit)
	go func() {
		for {
			select {
			case <-quit:
				return
			case s := <-sigs:
				sig, _ := s.(syscall.Signal)
				if sig == syscall.SIGWINCH {
					if !req.TTY {
						continue
					}
					if cols, rows, err := term.GetSize(stdoutFd); err == nil {
						select {
						case resize <- agent.Winsize{Rows: clampSize(rows), Cols: clampSize(cols)}:
						default:
						}
					}
					continue
				}
				select {
				case forward <- sig:
				default:
				}
			}
		}
	}()
	st, err := agent.RunExec(sctx, conn, eio)
	if err != nil {
		if errors.Is(err, agent.ErrSessionLost) {
			fmt.Fprintf(os.Stderr, "\r\nbanger exec: %v: the VM stopped, its agent died, or the daemon restarted\r\n", err)
			return exitAgentLost, nil
		}
		return 0, err
	}
	return st.Code, nil
}

func clampSize(n int) uint16 {
	if n < 0 {
		return 0
	}
	if n > 0xffff {
		return 0xffff
	}
	return uint16(n)
}

// copyStdio relays stdin and stdout over rw until the remote end closes.
func copyStdio(rw io.ReadWriteCloser) error {
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(rw, os.Stdin)
		done <- err
	}()
	_, err := io.Copy(os.Stdout, rw)
	_ = rw.Close()
	return err
}
