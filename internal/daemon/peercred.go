package daemon

import (
	"context"
	"errors"
	"net"

	"golang.org/x/sys/unix"
)

// Caller is who is on the other end of an API connection, from SO_PEERCRED.
type Caller struct {
	UID uint32
	GID uint32
	PID int32
}

// Root reports whether the caller is root.
func (c Caller) Root() bool { return c.UID == 0 }

type callerKey struct{}

// peerCred reads the credentials of the process connected on c.
func peerCred(c net.Conn) (Caller, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Caller{}, errors.New("not a unix socket connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Caller{}, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Caller{}, err
	}
	if serr != nil {
		return Caller{}, serr
	}
	return Caller{UID: cred.Uid, GID: cred.Gid, PID: cred.Pid}, nil
}

// connContext stores the connection's peer credentials in its context. A
// connection whose credentials cannot be read gets a caller that is nobody
// (uid 65534), never root.
func connContext(ctx context.Context, c net.Conn) context.Context {
	cr, err := peerCred(c)
	if err != nil {
		cr = Caller{UID: 65534, GID: 65534, PID: -1}
	}
	return context.WithValue(ctx, callerKey{}, cr)
}

// CallerFrom returns the caller of the request whose context is ctx.
func CallerFrom(ctx context.Context) Caller {
	if c, ok := ctx.Value(callerKey{}).(Caller); ok {
		return c
	}
	return Caller{UID: 65534, GID: 65534, PID: -1}
}
