// Package termsafe makes untrusted text safe to print on a terminal.
//
// Guest strings (the serial console, the first-boot log, error reasons a
// guest agent reported) and anything else the CLI did not write itself may
// hold terminal control sequences: ESC sequences can move the cursor,
// rewrite what was printed, set the window title, or on some terminals
// write the clipboard. The CLI passes such text through String or Writer,
// which keep newlines and tabs and show every other control character
// (C0, DEL, the C1 range) as a visible escape such as \x1b, and invalid
// UTF-8 as U+FFFD.
package termsafe

import (
	"fmt"
	"io"
	"strings"
	"unicode/utf8"
)

// String returns s with control characters other than newline and tab
// shown as escapes, and invalid UTF-8 replaced.
func String(s string) string {
	if clean(s) {
		return s
	}
	var b strings.Builder
	appendSafe(&b, []byte(s), true)
	return b.String()
}

func clean(s string) bool {
	for _, r := range s {
		if r == utf8.RuneError || unsafeRune(r) {
			return false
		}
	}
	return true
}

// unsafeRune reports whether r is a control character a terminal may act on.
func unsafeRune(r rune) bool {
	if r == '\n' || r == '\t' {
		return false
	}
	return r < 0x20 || r == 0x7f || (r >= 0x80 && r <= 0x9f)
}

// appendSafe writes the safe form of p. When final is false, an incomplete
// UTF-8 sequence at the end is left unwritten and its length returned.
func appendSafe(b *strings.Builder, p []byte, final bool) int {
	for len(p) > 0 {
		r, n := utf8.DecodeRune(p)
		if r == utf8.RuneError && n <= 1 {
			if !final && !utf8.FullRune(p) {
				return len(p)
			}
			b.WriteString("\uFFFD")
			p = p[1:]
			continue
		}
		switch {
		case r == '\r':
			// Serial consoles end lines with \r\n; a lone \r would let
			// the text overwrite what came before it on the line.
			if len(p) > 1 && p[1] == '\n' {
				b.WriteByte('\r')
				break
			}
			if len(p) == 1 && !final {
				return 1
			}
			b.WriteString(`\r`)
		case unsafeRune(r):
			if r < 0x80 {
				fmt.Fprintf(b, `\x%02x`, r)
			} else {
				fmt.Fprintf(b, `\u%04x`, r)
			}
		default:
			b.Write(p[:n])
		}
		p = p[n:]
	}
	return 0
}

// Writer filters a stream into w (see String). Close flushes a trailing
// incomplete sequence.
type Writer struct {
	w    io.Writer
	rest []byte
}

// NewWriter returns a Writer that writes the safe form of its input to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Write implements io.Writer.
func (s *Writer) Write(p []byte) (int, error) {
	buf := append(s.rest, p...)
	var b strings.Builder
	keep := appendSafe(&b, buf, false)
	s.rest = append([]byte(nil), buf[len(buf)-keep:]...)
	if _, err := io.WriteString(s.w, b.String()); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close writes what is left of an incomplete sequence, as escapes.
func (s *Writer) Close() error {
	if len(s.rest) == 0 {
		return nil
	}
	var b strings.Builder
	appendSafe(&b, s.rest, true)
	s.rest = nil
	_, err := io.WriteString(s.w, b.String())
	return err
}
