package main

import (
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/portfwd"
)

func TestParseForwards(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want string // specs joined by " ", or the error's substring after "!"
	}{
		{[]string{"8080:80"}, "127.0.0.1:8080:80/tcp"},
		{[]string{"8080"}, "127.0.0.1:8080:8080/tcp"},
		{[]string{":5432"}, "127.0.0.1:0:5432/tcp"},
		{[]string{"0:5432", "9229"}, "127.0.0.1:0:5432/tcp 127.0.0.1:9229:9229/tcp"},
		{[]string{"10.0.0.1:3000:3000"}, "10.0.0.1:3000:3000/tcp"},
		{[]string{"[::1]:3000:3000/tcp"}, "[::1]:3000:3000/tcp"},
		{[]string{"8000-8001:9000-9001"}, "127.0.0.1:8000:9000/tcp 127.0.0.1:8001:9001/tcp"},
		{[]string{"53:53/udp"}, "!TCP only"},
		{[]string{"8080:0"}, "!port 0"},
		{[]string{"x:80"}, "!not a port number"},
		{[]string{"8080:80", "8080:81"}, "!published twice"},
	} {
		specs, err := parseForwards(tc.in)
		if want, isErr := strings.CutPrefix(tc.want, "!"); isErr {
			if err == nil || !strings.Contains(err.Error(), want) || api.CodeOf(err) != api.CodeInvalid {
				t.Errorf("parseForwards(%q) = %v, %v; want an invalid-input error containing %q", tc.in, specs, err, want)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseForwards(%q): %v", tc.in, err)
			continue
		}
		var got []string
		for _, s := range specs {
			if s.Proto != portfwd.TCP {
				t.Errorf("parseForwards(%q): %v is not tcp", tc.in, s)
			}
			got = append(got, s.String())
		}
		if strings.Join(got, " ") != tc.want {
			t.Errorf("parseForwards(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
