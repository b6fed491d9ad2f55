package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// vmPathRE is a VM:PATH argument: a VM name, a colon, a guest path.
var vmPathRE = regexp.MustCompile(`^([A-Za-z0-9][A-Za-z0-9_.-]*):(.*)$`)

func newCpCmd(g *globals) *cobra.Command {
	var user string
	var quiet bool
	cmd := &cobra.Command{
		Use:   "cp [-u USER] SRC VM:DST | VM:SRC DST",
		Short: "Copy files and trees into or out of a running VM through its guest agent",
		Long: "Copy a file or a tree between this host and a running VM, in the manner of docker cp, over the\n" +
			"guest agent's channel (no sshd or network needed). Modes, mtimes and symlinks are kept; owners are\n" +
			"kept when you are root, and are USER's (default root) in the guest otherwise. A DST that is an\n" +
			"existing directory receives SRC inside it; else SRC is copied to DST. SRC ending in /. copies a\n" +
			"directory's contents. \"-\" as SRC reads a tar stream from standard input; as DST it writes one to\n" +
			"standard output. Guest paths are resolved inside the guest, relative ones from USER's home.",
		Example: "  banger cp ./src dev:/srv/\n  banger cp dev:/var/log/syslog .\n  tar c . | banger cp - dev:/srv",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) != 2 {
				return api.Errorf(api.CodeInvalid, "expected SRC and DST, one of them VM:PATH")
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			src, dst := args[0], args[1]
			sm, dm := splitVMPath(src), splitVMPath(dst)
			switch {
			case sm != nil && dm != nil:
				return api.Errorf(api.CodeInvalid, "copy between two VMs is not supported: copy to this host first")
			case sm == nil && dm == nil:
				return api.Errorf(api.CodeInvalid, "neither %q nor %q is VM:PATH", src, dst)
			case dm != nil:
				return copyToVM(c.Context(), g, src, dm[0], dm[1], user, quiet)
			default:
				return copyFromVM(c.Context(), g, sm[0], sm[1], dst, user, quiet)
			}
		},
	}
	cmd.Flags().StringVarP(&user, "user", "u", "", "guest user who owns what is copied in, and whose home relative guest paths start from")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "no progress line")
	return cmd
}

// splitVMPath returns [VM, PATH] for a VM:PATH argument, nil for a local
// path (one with a slash before any colon, or no colon).
func splitVMPath(arg string) []string {
	if strings.HasPrefix(arg, "/") || strings.HasPrefix(arg, ".") || arg == "-" {
		return nil
	}
	m := vmPathRE.FindStringSubmatch(arg)
	if m == nil {
		return nil
	}
	if m[2] == "" {
		m[2] = "."
	}
	return m[1:]
}

func copyToVM(ctx context.Context, g *globals, src, vm, dst, user string, quiet bool) error {
	var in io.Reader
	var tarErr chan error
	if src == "-" {
		in = os.Stdin
	} else {
		if _, err := os.Lstat(strings.TrimSuffix(src, "/.")); err != nil {
			return api.Errorf(api.CodeNotFound, "%v", err)
		}
		pr, pw := io.Pipe()
		tarErr = make(chan error, 1)
		go func() {
			err := agent.WriteTar(pw, src)
			_ = pw.CloseWithError(err)
			tarErr <- err
		}()
		defer pr.Close()
		in = pr
	}
	conn, err := g.client().Upgrade(ctx, "/vms/"+url.PathEscape(vm)+"/cp/in", api.CopyRequest{Path: dst, User: user})
	if err != nil {
		return err
	}
	p := newCopyProgress(g, quiet, "to "+vm)
	err = agent.CopyIn(ctx, conn, p.reader(in))
	p.done(err)
	if tarErr != nil {
		select {
		case terr := <-tarErr:
			if terr != nil {
				return fmt.Errorf("read %s: %w", src, terr)
			}
		default:
		}
	}
	return copyError(err)
}

func copyFromVM(ctx context.Context, g *globals, vm, src, dst, user string, quiet bool) error {
	var out io.Writer
	var extractErr chan error
	var pw *io.PipeWriter
	if dst == "-" {
		out = g.out
	} else {
		dir, rename, err := agent.CopyTarget(dst)
		if err != nil {
			return api.Errorf(api.CodeInvalid, "%v", err)
		}
		var pr *io.PipeReader
		pr, pw = io.Pipe()
		extractErr = make(chan error, 1)
		opts := agent.ExtractOptions{Rename: rename, UID: -1, GID: -1, KeepOwner: os.Geteuid() == 0}
		go func() {
			err := agent.ExtractTar(pr, dir, opts)
			_ = pr.CloseWithError(err)
			extractErr <- err
		}()
		out = pw
	}
	conn, err := g.client().Upgrade(ctx, "/vms/"+url.PathEscape(vm)+"/cp/out", api.CopyRequest{Path: src, User: user})
	if err != nil {
		if pw != nil {
			_ = pw.CloseWithError(err)
		}
		return err
	}
	p := newCopyProgress(g, quiet, "from "+vm)
	err = agent.CopyOut(ctx, conn, p.writer(out))
	p.done(err)
	if pw != nil {
		_ = pw.CloseWithError(err)
		if xerr := <-extractErr; xerr != nil && err == nil {
			return fmt.Errorf("write %s: %w", dst, xerr)
		}
	}
	return copyError(err)
}

func copyError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, agent.ErrSessionLost) {
		fmt.Fprintf(os.Stderr, "banger cp: %v\n", err)
		return exitError{code: exitAgentLost}
	}
	return err
}

// copyProgress prints bytes copied and the rate on standard error when it
// is a terminal.
type copyProgress struct {
	n     atomic.Int64
	what  string
	out   io.Writer
	start time.Time
	stop  chan struct{}
	wg    sync.WaitGroup
}

func newCopyProgress(g *globals, quiet bool, what string) *copyProgress {
	p := &copyProgress{what: what, start: time.Now(), stop: make(chan struct{})}
	if quiet || !term.IsTerminal(int(os.Stderr.Fd())) || g.errOut != os.Stderr { //nolint:gosec // small fd
		return p
	}
	p.out = g.errOut
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				p.line("\r")
			}
		}
	}()
	return p
}

func (p *copyProgress) line(prefix string) {
	n := p.n.Load()
	secs := time.Since(p.start).Seconds()
	rate := 0.0
	if secs > 0 {
		rate = float64(n) / secs / 1e6
	}
	fmt.Fprintf(p.out, "%scopying %s: %.1f MiB (%.1f MB/s)\x1b[K", prefix, p.what, float64(n)/(1<<20), rate)
}

func (p *copyProgress) done(err error) {
	close(p.stop)
	p.wg.Wait()
	if p.out != nil {
		p.line("\r")
		if err == nil {
			fmt.Fprintln(p.out, ", done")
		} else {
			fmt.Fprintln(p.out, ", failed")
		}
	}
}

type countingReader struct {
	r io.Reader
	p *copyProgress
}

func (c countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.p.n.Add(int64(n))
	return n, err
}

type countingWriter struct {
	w io.Writer
	p *copyProgress
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.p.n.Add(int64(n))
	return n, err
}

func (p *copyProgress) reader(r io.Reader) io.Reader { return countingReader{r, p} }
func (p *copyProgress) writer(w io.Writer) io.Writer { return countingWriter{w, p} }
