package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/progress"
	"github.com/bangerdev/banger/internal/termsafe"
	"golang.org/x/term"
)

// progressRenderer draws progress events: a live bar on a terminal, plain
// lines (one per phase or item change, and every 25%) otherwise.
type progressRenderer struct {
	w       io.Writer
	tty     bool
	mu      sync.Mutex
	last    string // key of the last line drawn
	lastPct int
	live    bool // a \r line is open
	lastAt  time.Time
}

func newProgressRenderer(w io.Writer) *progressRenderer {
	tty := false
	if f, ok := w.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	return &progressRenderer{w: w, tty: tty}
}

// Func returns the callback that renders events.
func (p *progressRenderer) Func() progress.Func {
	return func(ev progress.Event) { p.render(ev) }
}

func (p *progressRenderer) render(ev progress.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	key := ev.Phase + "/" + ev.Item
	ev.Phase, ev.Item, ev.Message = termsafe.String(ev.Phase), termsafe.String(ev.Item), termsafe.String(ev.Message)
	label := ev.Phase
	if ev.Item != "" {
		label += " " + ev.Item
	}
	pct := -1
	if ev.Total > 0 {
		pct = int(ev.Current * 100 / ev.Total)
	}
	if p.tty {
		if key != p.last && p.live {
			fmt.Fprintln(p.w)
			p.live = false
		}
		// Throttle redraws of the same line to 10 per second.
		if key == p.last && !ev.Done && time.Since(p.lastAt) < 100*time.Millisecond {
			return
		}
		line := "  " + label
		if pct >= 0 {
			line += " " + bar(pct, 24) + fmt.Sprintf(" %3d%% %s", pct, amount(ev))
		} else if ev.Current > 0 {
			line += " " + amount(ev)
		}
		if ev.Message != "" {
			line += "  " + ev.Message
		}
		if ev.Done {
			line += " ✓"
		}
		fmt.Fprint(p.w, "\r\033[K"+line)
		p.live = true
		p.last, p.lastAt = key, time.Now()
		if ev.Done {
			fmt.Fprintln(p.w)
			p.live = false
			p.last = ""
		}
		return
	}
	// Plain lines: a new phase or item, each 25% step, and completion.
	step := -1
	if pct >= 0 {
		step = pct / 25
	}
	if key == p.last && !ev.Done && (step < 0 || step == p.lastPct) && ev.Message == "" {
		return
	}
	p.last, p.lastPct = key, step
	line := label
	if pct >= 0 {
		line += fmt.Sprintf(" %d%% %s", pct, amount(ev))
	}
	if ev.Message != "" {
		line += ": " + ev.Message
	}
	if ev.Done {
		line += " (done)"
	}
	fmt.Fprintln(p.w, line)
}

// Close ends an open live line.
func (p *progressRenderer) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.live {
		fmt.Fprintln(p.w)
		p.live = false
	}
}

func bar(pct, width int) string {
	if pct > 100 {
		pct = 100
	}
	n := pct * width / 100
	return "[" + strings.Repeat("=", n) + strings.Repeat(" ", width-n) + "]"
}

func amount(ev progress.Event) string {
	if ev.Unit != "" && ev.Unit != "bytes" {
		if ev.Total > 0 {
			return fmt.Sprintf("%d/%d %s", ev.Current, ev.Total, ev.Unit)
		}
		return fmt.Sprintf("%d %s", ev.Current, ev.Unit)
	}
	if ev.Total > 0 {
		return humanBytes(ev.Current) + "/" + humanBytes(ev.Total)
	}
	return humanBytes(ev.Current)
}

func progressEvent(phase, item, msg string) progress.Event {
	return progress.Event{Phase: phase, Item: item, Message: msg}
}
