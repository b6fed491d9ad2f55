package portfwd

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseSpecs(t *testing.T) {
	lo := DefaultHostIP
	any4 := netip.MustParseAddr("0.0.0.0")
	v6 := netip.MustParseAddr("::1")
	for _, tc := range []struct {
		in   string
		want []Spec
	}{
		{"8080", []Spec{{HostIP: lo, HostPort: 0, GuestPort: 8080, Proto: TCP}}},
		{"0:8080", []Spec{{HostIP: lo, HostPort: 0, GuestPort: 8080, Proto: TCP}}},
		{"9000:80", []Spec{{HostIP: lo, HostPort: 9000, GuestPort: 80, Proto: TCP}}},
		{"9000:80/udp", []Spec{{HostIP: lo, HostPort: 9000, GuestPort: 80, Proto: UDP}}},
		{"9000:80/TCP", []Spec{{HostIP: lo, HostPort: 9000, GuestPort: 80, Proto: TCP}}},
		{"0.0.0.0:9000:80", []Spec{{HostIP: any4, HostPort: 9000, GuestPort: 80, Proto: TCP}}},
		{"127.0.0.1::80", []Spec{{HostIP: lo, HostPort: 0, GuestPort: 80, Proto: TCP}}},
		{"[::1]:9000:80/udp", []Spec{{HostIP: v6, HostPort: 9000, GuestPort: 80, Proto: UDP}}},
		{"[::1]::80", []Spec{{HostIP: v6, HostPort: 0, GuestPort: 80, Proto: TCP}}},
		{"8000-8002:9000-9002", []Spec{
			{HostIP: lo, HostPort: 8000, GuestPort: 9000, Proto: TCP},
			{HostIP: lo, HostPort: 8001, GuestPort: 9001, Proto: TCP},
			{HostIP: lo, HostPort: 8002, GuestPort: 9002, Proto: TCP},
		}},
		{"65535:65535", []Spec{{HostIP: lo, HostPort: 65535, GuestPort: 65535, Proto: TCP}}},
	} {
		got, err := ParseSpecs(tc.in)
		if err != nil {
			t.Errorf("ParseSpecs(%q): %v", tc.in, err)
			continue
		}
		if d := cmp.Diff(tc.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
			t.Errorf("ParseSpecs(%q) (-want +got):\n%s", tc.in, d)
		}
		// String round-trips.
		for _, s := range got {
			again, err := ParseSpecs(s.String())
			if err != nil || len(again) != 1 || again[0] != s {
				t.Errorf("ParseSpecs(%q.String() = %q) = %v, %v; want %v", tc.in, s.String(), again, err, s)
			}
		}
	}
}

func TestParseSpecsRefuses(t *testing.T) {
	for _, in := range []string{
		"", ":", "80:", "0", "8080:0", "65536:80", "80:65536", "-1:80", "+80:80", "080:80",
		"a:80", "80/sctp", "80/", "1.2.3:80:80", "::1:80:80", "[::1]:80", "[1.2.3.4]:80:80",
		"[::1:80:80", "1.2.3.4:5:6:7", "8000-8001:80", "8000-8001:9000-9002", "9-8:9-8", "0-2:1-3",
		"224.0.0.1:80:80", "[fe80::1%eth0]:80:80", "localhost:80:80",
	} {
		if got, err := ParseSpecs(in); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("ParseSpecs(%q) = %v, %v; want an error wrapping ErrInvalidSpec", in, got, err)
		}
	}
}

func TestNeedsRoot(t *testing.T) {
	for in, want := range map[string]bool{
		"8080:80":              false,
		"0:80":                 false,
		"80:80":                true,
		"1023:80":              true,
		"1024:80":              false,
		"0.0.0.0:8080:80":      true,
		"10.1.2.3:0:80":        true,
		"127.0.0.2:8080:80":    false,
		"[::1]:8080:80":        false,
		"[::]:8080:80":         true,
		"127.0.0.1:443:80/udp": true,
	} {
		specs, err := ParseSpecs(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := specs[0].NeedsRoot(); got != want {
			t.Errorf("ParseSpecs(%q)[0].NeedsRoot() = %v, want %v", in, got, want)
		}
	}
}

func TestCheckDistinct(t *testing.T) {
	parse := func(vals ...string) []Spec {
		var out []Spec
		for _, v := range vals {
			s, err := ParseSpecs(v)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, s...)
		}
		return out
	}
	if err := CheckDistinct(parse("8080:80", "8080:81/udp", "0:80", "0:80", "127.0.0.2:8080:80")); err != nil {
		t.Errorf("distinct specs refused: %v", err)
	}
	if err := CheckDistinct(parse("8080:80", "8080:81")); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("the same host port twice: got %v, want ErrInvalidSpec", err)
	}
}
