package netctl

import "golang.org/x/sys/unix"

const (
	errExist = unix.EEXIST
	errNoDev = unix.ENODEV
)
