package mounts

import (
	"fmt"
	"path"
	"strings"
)

// Spec is one --mount: the host folder HostDir at GuestDir in the guest.
type Spec struct {
	HostDir  string `json:"host_dir"`
	GuestDir string `json:"guest_dir"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// String formats s as ParseSpec reads it.
func (s Spec) String() string {
	if s.ReadOnly {
		return s.HostDir + ":" + s.GuestDir + ":ro"
	}
	return s.HostDir + ":" + s.GuestDir
}

// ParseSpec parses HOSTDIR:GUESTDIR[:ro|:rw], in the manner of docker -v.
// Both paths must be absolute (the CLI makes a relative HOSTDIR absolute
// against its working directory before sending it); GUESTDIR may not be
// "/" nor contain "..".
func ParseSpec(value string) (Spec, error) {
	bad := func(format string, args ...any) (Spec, error) {
		return Spec{}, fmt.Errorf("%w %q: %s (want HOSTDIR:GUESTDIR[:ro], e.g. /home/me/src:/src)", ErrInvalidSpec, value, fmt.Sprintf(format, args...))
	}
	parts := strings.Split(value, ":")
	var s Spec
	switch len(parts) {
	case 2:
	case 3:
		switch parts[2] {
		case "ro":
			s.ReadOnly = true
		case "rw":
		default:
			return bad("option %q is not ro or rw", parts[2])
		}
	default:
		return bad("want two or three fields separated by ':'")
	}
	s.HostDir, s.GuestDir = parts[0], parts[1]
	for _, p := range []string{s.HostDir, s.GuestDir} {
		if p == "" || !strings.HasPrefix(p, "/") {
			return bad("%q is not an absolute path", p)
		}
		for _, r := range p {
			if r < 0x20 || r == 0x7f {
				return bad("control character in %q", p)
			}
		}
	}
	s.HostDir = path.Clean(s.HostDir)
	for _, el := range strings.Split(s.GuestDir, "/") {
		if el == ".." {
			return bad("guest path %q contains ..", s.GuestDir)
		}
	}
	s.GuestDir = path.Clean(s.GuestDir)
	if s.GuestDir == "/" {
		return bad("cannot mount over the guest's root")
	}
	return s, nil
}

// CheckDistinct refuses two specs with the same guest folder.
func CheckDistinct(specs []Spec) error {
	seen := map[string]bool{}
	for _, s := range specs {
		if seen[s.GuestDir] {
			return fmt.Errorf("%w: guest folder %s is mounted twice", ErrInvalidSpec, s.GuestDir)
		}
		seen[s.GuestDir] = true
	}
	return nil
}
