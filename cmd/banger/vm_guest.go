package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/guestabi"
	"github.com/bangerdev/banger/internal/model"
)

// guestFlags are vm create's --init, --cmd and --env.
type guestFlags struct {
	init string
	cmd  string
	env  []string
}

func (gf *guestFlags) add(f *pflag.FlagSet) {
	f.StringVar(&gf.init, "init", "auto", "PID 1: auto (systemd when the image has it, else banger's init), image or banger")
	f.StringVar(&gf.cmd, "cmd", "", "replace the image's Cmd (its Entrypoint stays), split as a shell would, e.g. --cmd 'sleep 60'")
	f.StringArrayVar(&gf.env, "env", nil, "set KEY=value in the main process's environment (repeatable)")
}

// apply puts the flags into req.
func (gf *guestFlags) apply(req *api.CreateVMRequest, cmdSet bool) error {
	req.Init, req.Env = gf.init, gf.env
	if cmdSet {
		argv, err := splitShellWords(gf.cmd)
		if err != nil {
			return api.Errorf(api.CodeInvalid, "--cmd %q: %v", gf.cmd, err)
		}
		if argv == nil {
			argv = []string{} // --cmd '': no Cmd at all
		}
		req.Cmd = argv
	}
	return nil
}

// splitShellWords splits s into words as a POSIX shell would, without any
// expansion: blanks separate words, single quotes keep everything, double
// quotes keep everything but \" \\ \$ \`, a backslash outside quotes
// escapes the next character.
func splitShellWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	have := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch c {
		case ' ', '\t', '\n':
			if have {
				words = append(words, cur.String())
				cur.Reset()
				have = false
			}
		case '\\':
			if i+1 >= len(s) {
				return nil, errors.New("trailing backslash")
			}
			i++
			cur.WriteByte(s[i])
			have = true
		case '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, errors.New("unterminated single quote")
			}
			cur.WriteString(s[i+1 : i+1+j])
			i += j + 1
			have = true
		case '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) && strings.IndexByte("\"\\$`", s[i+1]) >= 0 {
					i++
				}
				cur.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, errors.New("unterminated double quote")
			}
			have = true
		default:
			cur.WriteByte(c)
			have = true
		}
	}
	if have {
		words = append(words, cur.String())
	}
	return words, nil
}

// guestPairs are vm inspect's lines about the init and the main process.
func guestPairs(v api.VM) [][2]string {
	asked := string(v.Init)
	if asked == "" {
		asked = string(guestabi.InitAuto)
	}
	pairs := [][2]string{{"init", asked + ", ran: " + orDash(string(v.InitRan))}}
	if len(v.Cmd) > 0 || v.Cmd != nil {
		pairs = append(pairs, [2]string{"cmd override", quoteArgv(v.Cmd)})
	}
	if len(v.Env) > 0 {
		pairs = append(pairs, [2]string{"env override", strings.Join(v.Env, " ")})
	}
	if m := v.Main; m != nil {
		pairs = append(pairs, [2]string{"main process", mainSummary(*m)})
	}
	return pairs
}

func mainSummary(m guestabi.MainState) string {
	s := string(m.Status)
	if m.PID != 0 {
		s += ", pid " + strconv.Itoa(m.PID)
	}
	if m.ExitCode != nil {
		s += ", exit code " + strconv.Itoa(*m.ExitCode)
	}
	if m.Signal != "" {
		s += ", killed by " + m.Signal
	}
	if m.Error != "" {
		s += ": " + m.Error
	}
	if len(m.Argv) > 0 {
		s += " (" + quoteArgv(m.Argv) + ")"
	}
	return s
}

func quoteArgv(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = strconv.Quote(a)
	}
	return "[" + strings.Join(q, " ") + "]"
}

// imageGuestPairs are image inspect's lines about the run config and the
// init VMs of the image get.
func imageGuestPairs(img model.Image) [][2]string {
	init := "the image's own init (pulled by an older banger)"
	switch img.Init {
	case guestabi.InitImage:
		init = "the image's own (systemd): " + img.InitReason
	case guestabi.InitBanger:
		init = "banger's: " + img.InitReason
	}
	pairs := [][2]string{{"init", init}}
	if c := img.Config; c != nil {
		pairs = append(pairs, [][2]string{
			{"entrypoint", quoteArgv(c.Entrypoint)}, {"cmd", quoteArgv(c.Cmd)}, {"env", strings.Join(c.Env, " ")},
			{"working dir", c.WorkingDir}, {"user", c.User}, {"exposed ports", strings.Join(c.ExposedPorts, ", ")},
		}...)
	}
	return pairs
}

// copyMainLines copies the main process's console lines (those behind
// guestabi.MainConsolePrefix), without the prefix, from r to w.
func copyMainLines(w io.Writer, r io.Reader) error {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadString('\n')
		if i := strings.Index(line, guestabi.MainConsolePrefix); i >= 0 && strings.HasSuffix(line, "\n") {
			line = strings.TrimSuffix(line[i+len(guestabi.MainConsolePrefix):], "\r\n")
			line = strings.TrimSuffix(line, "\n")
			if _, werr := fmt.Fprintln(w, line); werr != nil {
				return werr
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}
