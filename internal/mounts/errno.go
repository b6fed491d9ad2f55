package mounts

import (
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"syscall"

	"github.com/pkg/sftp"
)

// Errors; test with errors.Is.
var (
	// ErrNotAbsolute: a mount path is not absolute.
	ErrNotAbsolute = errors.New("path is not absolute")
	// ErrInvalidSpec: a --mount value does not parse.
	ErrInvalidSpec = errors.New("invalid mount spec")
)

// Errno is a failed host file operation. SFTP version 3 has only a few
// status codes, so the host server sends the errno in the status message
// ("errno=17 ...") and the guest side turns it back into the same errno
// (EEXIST, ENOTEMPTY, EROFS...), which tools like git depend on.
type Errno struct {
	Op    string
	Path  string
	Errno syscall.Errno
	Err   error
}

func (e *Errno) Error() string {
	return fmt.Sprintf("errno=%d %s %s: %v", int(e.Errno), e.Op, e.Path, e.Err)
}

func (e *Errno) Unwrap() error { return e.Errno }

var errnoInMessage = regexp.MustCompile(`errno=([0-9]{1,4}) `)

// toErrno maps an SFTP client error onto the errno to give the guest.
func toErrno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var se *sftp.StatusError
	if errors.As(err, &se) {
		if m := errnoInMessage.FindStringSubmatch(se.Error()); m != nil {
			if n, err := strconv.Atoi(m[1]); err == nil && n > 0 {
				return syscall.Errno(n)
			}
		}
		return syscall.EIO
	}
	var errno syscall.Errno
	switch {
	case errors.Is(err, os.ErrNotExist):
		return syscall.ENOENT
	case errors.Is(err, os.ErrPermission):
		return syscall.EACCES
	case errors.As(err, &errno):
		return errno
	case errors.Is(err, io.EOF):
		return 0
	}
	return syscall.EIO
}
