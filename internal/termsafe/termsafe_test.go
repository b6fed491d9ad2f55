package termsafe

import (
	"bytes"
	"testing"
)

func TestString(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"plain text\nnext\tline", "plain text\nnext\tline"},
		{"\x1b]0;pwned\x07title", `\x1b]0;pwned\x07title`},
		{"\x1b[2J\x1b[Hclear", `\x1b[2J\x1b[Hclear`},
		{"\x1b]52;c;ZXZpbA==\x07", `\x1b]52;c;ZXZpbA==\x07`}, // clipboard write
		{"a\rb", `a\rb`},
		{"line\r\n", "line\r\n"},
		{"\u009b31m", `\u009b31m`}, // 8-bit CSI
		{"bad \xff utf8", "bad \uFFFD utf8"},
		{"del\x7f", `del\x7f`},
		{"héllo ✓", "héllo ✓"},
	} {
		if got := String(c.in); got != c.want {
			t.Errorf("String(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// TestWriterSplitInput: the stream filter gives the same result whatever
// the chunking, including sequences split across writes.
func TestWriterSplitInput(t *testing.T) {
	in := []byte("boot \x1b[31mred\x1b[0m ✓ \u009b line\r\nnext\r")
	want := String(string(in))
	for size := 1; size <= len(in); size++ {
		var out bytes.Buffer
		w := NewWriter(&out)
		for i := 0; i < len(in); i += size {
			if _, err := w.Write(in[i:min(i+size, len(in))]); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		if out.String() != want {
			t.Fatalf("chunks of %d: %q, want %q", size, out.String(), want)
		}
	}
}
