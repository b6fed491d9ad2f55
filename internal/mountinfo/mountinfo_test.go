package mountinfo

import (
	"slices"
	"testing"
)

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/a\040b`: "/a b", `/plain`: "/plain", `/x\134y`: `/x\y`, `/t\011n\012`: "/t\tn\n",
		`/bad\9`: `/bad\9`, `/end\04`: `/end\04`, `/big\777`: `/big\777`,
	} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParse(t *testing.T) {
	mi := []byte(`22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
35 22 0:30 / /mnt/src rw,nosuid,nodev,relatime shared:1 master:2 - fuse.banger banger rw,user_id=0,group_id=0
short line
36 22 0:31 / /mnt/with\040space rw - fuse.banger banger rw
40 22 0:40 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw
`)
	got := Parse(mi)
	want := []Mount{
		{"0:21", "/", "ext4"},
		{"0:30", "/mnt/src", "fuse.banger"},
		{"0:31", "/mnt/with space", "fuse.banger"},
		{"0:40", "/sys/fs/cgroup", "cgroup2"},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Parse:\n got %v\nwant %v", got, want)
	}
	if p := Points(got); !slices.Equal(p, []string{"/", "/mnt/src", "/mnt/with space", "/sys/fs/cgroup"}) {
		t.Errorf("Points = %v", p)
	}
}

func TestReadSelf(t *testing.T) {
	ms, err := Read()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(Points(ms), "/") {
		t.Errorf("this process's mount table has no /: %v", ms)
	}
}
