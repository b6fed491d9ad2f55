package main

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestSplitShellWords(t *testing.T) {
	for in, want := range map[string][]string{
		"sleep 60":                       {"sleep", "60"},
		"  sh -c 'echo $HOME; exit 3'  ": {"sh", "-c", "echo $HOME; exit 3"},
		`printf "a \"b\" \$c\n" x\ y`:    {"printf", `a "b" $c\n`, "x y"},
		`''`:                             {""},
		"":                               nil,
		`a"b"'c'd`:                       {"abcd"},
	} {
		got, err := splitShellWords(in)
		if err != nil {
			t.Errorf("splitShellWords(%q): %v", in, err)
			continue
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("splitShellWords(%q) (-want +got):\n%s", in, diff)
		}
	}
	for _, bad := range []string{`'open`, `"open`, `trailing\`} {
		if got, err := splitShellWords(bad); err == nil {
			t.Errorf("splitShellWords(%q) = %q, want an error", bad, got)
		}
	}
}

func TestCopyMainLines(t *testing.T) {
	console := "[    1.0] kernel line\nbanger-init: main process 9: [\"app\"]\nmain| hello\r\n\x1b[0mmain| second line\nmain| partial"
	var out strings.Builder
	if err := copyMainLines(&out, strings.NewReader(console)); err != nil {
		t.Fatal(err)
	}
	if want := "hello\nsecond line\n"; out.String() != want {
		t.Errorf("main lines %q, want %q", out.String(), want)
	}
}
