package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// VsockAddr is an AF_VSOCK address.
type VsockAddr struct {
	CID  uint32
	Port uint32
}

// Network implements net.Addr.
func (a VsockAddr) Network() string { return "vsock" }

// String implements net.Addr.
func (a VsockAddr) String() string { return fmt.Sprintf("vsock:%d:%d", a.CID, a.Port) }

// vsockConn is a connected AF_VSOCK socket. The fd is non-blocking and
// registered with the runtime poller through os.File, so deadlines work.
type vsockConn struct {
	*os.File
	local, remote VsockAddr
}

func (c *vsockConn) LocalAddr() net.Addr  { return c.local }
func (c *vsockConn) RemoteAddr() net.Addr { return c.remote }

type vsockListener struct {
	f    *os.File
	addr VsockAddr
}

// ListenVsock listens on AF_VSOCK port for connections from any CID.
func ListenVsock(port uint32) (net.Listener, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("vsock socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("bind vsock port %d: %w", port, err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("listen on vsock port %d: %w", port, err)
	}
	addr := VsockAddr{CID: unix.VMADDR_CID_ANY, Port: port}
	if sa, err := unix.Getsockname(fd); err == nil {
		if vm, ok := sa.(*unix.SockaddrVM); ok {
			addr = VsockAddr{CID: vm.CID, Port: vm.Port}
		}
	}
	return &vsockListener{f: os.NewFile(uintptr(fd), "vsock-listener"), addr: addr}, nil
}

func (l *vsockListener) Accept() (net.Conn, error) {
	rc, err := l.f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("vsock accept: %w", err)
	}
	var (
		nfd  int
		sa   unix.Sockaddr
		aerr error
	)
	err = rc.Read(func(fd uintptr) bool {
		nfd, sa, aerr = unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC) //nolint:gosec // fd from the runtime
		return !errors.Is(aerr, unix.EAGAIN)
	})
	if err != nil {
		return nil, fmt.Errorf("vsock accept: %w", err)
	}
	if aerr != nil {
		return nil, fmt.Errorf("vsock accept: %w", aerr)
	}
	c := &vsockConn{File: os.NewFile(uintptr(nfd), "vsock-conn"), local: l.addr}
	if vm, ok := sa.(*unix.SockaddrVM); ok {
		c.remote = VsockAddr{CID: vm.CID, Port: vm.Port}
	}
	return c, nil
}

func (l *vsockListener) Close() error   { return l.f.Close() }
func (l *vsockListener) Addr() net.Addr { return l.addr }

// DialVsock connects to AF_VSOCK cid:port (needs vhost-vsock or another
// vsock transport on the host).
func DialVsock(ctx context.Context, cid, port uint32) (net.Conn, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("vsock socket: %w", err)
	}
	f := os.NewFile(uintptr(fd), "vsock-conn")
	fail := func(err error) (net.Conn, error) {
		_ = f.Close()
		return nil, fmt.Errorf("connect to vsock %d:%d: %w", cid, port, err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return fail(err)
	}
	if dl, ok := ctx.Deadline(); ok {
		if err := f.SetWriteDeadline(dl); err != nil {
			return fail(err)
		}
	}
	stop := context.AfterFunc(ctx, func() { _ = f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	started := false
	var cerr error
	err = rc.Write(func(fd uintptr) bool {
		if !started {
			started = true
			cerr = unix.Connect(int(fd), &unix.SockaddrVM{CID: cid, Port: port}) //nolint:gosec // fd from the runtime
			return !errors.Is(cerr, unix.EINPROGRESS)
		}
		var errno int
		errno, cerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR) //nolint:gosec // fd from the runtime
		if cerr == nil && errno != 0 {
			cerr = unix.Errno(errno) //nolint:gosec // errno values are small
		}
		return true
	})
	if err != nil {
		if ctx.Err() != nil {
			return fail(ctx.Err())
		}
		return fail(err)
	}
	if cerr != nil {
		return fail(cerr)
	}
	if err := f.SetWriteDeadline(time.Time{}); err != nil {
		return fail(err)
	}
	c := &vsockConn{File: f, remote: VsockAddr{CID: cid, Port: port}}
	if sa, err := unix.Getsockname(fd); err == nil {
		if vm, ok := sa.(*unix.SockaddrVM); ok {
			c.local = VsockAddr{CID: vm.CID, Port: vm.Port}
		}
	}
	return c, nil
}
