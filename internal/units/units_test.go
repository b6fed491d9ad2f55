package units

import "testing"

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"", 0, true}, {"4096", 4096, true}, {"1K", 1 << 10, true}, {"512M", 512 << 20, true},
		{"2G", 2 << 30, true}, {"1.5G", 3 << 29, true}, {"1GiB", 1 << 30, true}, {"1gb", 1 << 30, true},
		{"3T", 3 << 40, true}, {"10X", 0, false}, {"G", 0, false}, {"-1G", 0, false}, {"1..2G", 0, false},
	} {
		got, err := ParseSize(tc.in)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("ParseSize(%q) = %d, %v; want %d (ok=%v)", tc.in, got, err, tc.want, tc.ok)
		}
	}
}
