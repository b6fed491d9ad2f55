package guestnet

import (
	"testing"
)

func TestHosts(t *testing.T) {
	for _, tc := range []struct{ name, old, host, want string }{
		{"empty", "", "vm-1", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tvm-1\n"},
		{"image's name replaced", "127.0.0.1\tlocalhost\n127.0.1.1\tsaved-vm\n", "clone-1", "127.0.0.1\tlocalhost\n127.0.1.1\tclone-1\n"},
		{"named elsewhere", "127.0.0.1 localhost\n10.0.0.5 vm-1\n", "vm-1", "127.0.0.1 localhost\n10.0.0.5 vm-1\n"},
		{"no trailing newline", "127.0.0.1 localhost", "", "127.0.0.1 localhost\n"},
		{"comment is not a name", "# localhost vm-1\n", "vm-1", "# localhost vm-1\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tvm-1\n"},
		{"other lines kept", "127.0.0.1 localhost\n192.0.2.1 db\n127.0.1.1 old other\n", "new", "127.0.0.1 localhost\n192.0.2.1 db\n127.0.1.1\tnew\n"},
	} {
		got := string(Hosts([]byte(tc.old), tc.host))
		if got != tc.want {
			t.Errorf("%s: Hosts(%q, %q) =\n%q\nwant\n%q", tc.name, tc.old, tc.host, got, tc.want)
		}
		if again := string(Hosts([]byte(got), tc.host)); again != got {
			t.Errorf("%s: not idempotent: %q then %q", tc.name, got, again)
		}
	}
}
