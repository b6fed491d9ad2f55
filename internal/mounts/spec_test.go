package mounts

import (
	"errors"
	"fmt"
	"syscall"
	"testing"

	"github.com/pkg/sftp"
)

func TestParseSpec(t *testing.T) {
	for in, want := range map[string]Spec{
		"/home/me/src:/src":       {HostDir: "/home/me/src", GuestDir: "/src"},
		"/home/me/src/:/src/:ro":  {HostDir: "/home/me/src", GuestDir: "/src", ReadOnly: true},
		"/a//b:/mnt/x:rw":         {HostDir: "/a/b", GuestDir: "/mnt/x"},
		"/:/host":                 {HostDir: "/", GuestDir: "/host"},
		"/a/../b:/c":              {HostDir: "/b", GuestDir: "/c"},
		"/with space:/with space": {HostDir: "/with space", GuestDir: "/with space"},
	} {
		got, err := ParseSpec(in)
		if err != nil || got != want {
			t.Errorf("ParseSpec(%q) = %+v, %v; want %+v", in, got, err, want)
		}
		if again, err := ParseSpec(got.String()); err != nil || again != got {
			t.Errorf("ParseSpec(%q.String()) = %+v, %v", in, again, err)
		}
	}
	for _, in := range []string{
		"", "/a", "a:/b", "/a:b", "/a:/", "/a:/b/../..", "/a:/b/..", "/a:/b:rx", "/a:/b:ro:x",
		"/a\n:/b", "/a:/b\x7f", ":/b", "/a:",
	} {
		if got, err := ParseSpec(in); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("ParseSpec(%q) = %+v, %v; want ErrInvalidSpec", in, got, err)
		}
	}
	if err := CheckDistinct([]Spec{{HostDir: "/a", GuestDir: "/x"}, {HostDir: "/b", GuestDir: "/x"}}); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("two mounts on one guest folder: %v; want ErrInvalidSpec", err)
	}
}

func TestToErrno(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want syscall.Errno
	}{
		{nil, 0},
		{&Errno{Op: "mkdir", Path: "/x", Errno: syscall.EEXIST, Err: syscall.EEXIST}, syscall.EEXIST},
		{fmt.Errorf("wrapped: %w", syscall.ENOTEMPTY), syscall.ENOTEMPTY},
		{errors.New("connection lost"), syscall.EIO},
		{sftp.ErrSSHFxConnectionLost, syscall.EIO},
	} {
		if got := toErrno(tc.err); got != tc.want {
			t.Errorf("toErrno(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
