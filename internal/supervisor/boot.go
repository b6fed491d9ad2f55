package supervisor

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/bangerdev/banger/internal/agent"
)

// BootWait says what "ready" means for WaitBooted.
type BootWait struct {
	// SSHKey is authorized for root in the guest once the agent answers.
	SSHKey string
	// AgentOnly makes the agent's answer and a finished first boot enough;
	// otherwise the guest must also report its SSH host key and accept
	// connections on IP:22.
	AgentOnly bool
	// IP is the guest's address ("" skips the sshd check).
	IP string
	// Status is told every status the agent reports while the guest is
	// not ready yet (the one that ends the wait is WaitBooted's result).
	Status func(*agent.Status)
	// Poll is how often the agent is asked; zero means a second.
	Poll time.Duration
	// Trace, when set, is told each step of the wait as it passes (the
	// agent's first answer, the key authorized, each status), for the
	// daemon's log of where a boot spends its time.
	Trace func(step string)
}

func (w BootWait) trace(format string, args ...any) {
	if w.Trace != nil {
		w.Trace(fmt.Sprintf(format, args...))
	}
}

// WaitBooted waits on the VM's agent session until the guest is ready for
// ssh: the agent answers, the key is authorized, first boot has finished
// (or failed: the status says so), the host key is known and sshd accepts
// connections. ctx bounds the wait.
func (s *Supervisor) WaitBooted(ctx context.Context, w BootWait) (*agent.Status, error) {
	var c *agent.Client
	attempts := 0
	for {
		attempts++
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		cl, err := s.Session(cctx)
		cancel()
		if err == nil {
			c = cl
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("the agent never answered (last error: %w)", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	// Session proved the agent alive (a fresh session's hello, or a held
	// one's health call): no health call of its own.
	w.trace("agent session open after %d attempt(s)", attempts)
	if w.SSHKey != "" {
		if _, err := c.AuthorizeKey(ctx, w.SSHKey); err != nil {
			s.DropSession(c)
			return nil, fmt.Errorf("authorize ssh key: %w", err)
		}
		w.trace("ssh key authorized")
	}
	poll := w.Poll
	if poll <= 0 {
		poll = time.Second
	}
	for {
		st, err := c.Status(ctx)
		if err != nil {
			s.DropSession(c)
			return nil, fmt.Errorf("agent status: %w", err)
		}
		w.trace("status: first boot %q, host key %t, sshd %t, streams %d", st.FirstBoot, st.HostKey != "", st.SSHD, st.Streams)
		// Failed: the status says so. Skipped: banger's PID 1 found no sshd
		// to install (or no way to): the agent's SSH server is the way in,
		// ready now.
		if st.FirstBoot == agent.FirstBootFailed || st.FirstBoot == agent.FirstBootSkipped {
			return st, nil
		}
		booted := st.FirstBoot == agent.FirstBootDone || st.FirstBoot == agent.FirstBootUnknown
		if booted && w.AgentOnly {
			return st, nil
		}
		// An image without sshd is ready once its agent, which serves ssh
		// itself over the agent channel, has made the host key.
		if booted && st.HostKey != "" && (sshOpen(ctx, w.IP) || (st.Streams > 0 && !st.SSHD)) {
			return st, nil
		}
		if w.Status != nil {
			w.Status(st)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("first boot is %s and sshd is not ready yet", st.FirstBoot)
		case <-time.After(poll):
		}
	}
}

// sshOpen reports whether ip:22 accepts a TCP connection.
func sshOpen(ctx context.Context, ip string) bool {
	if ip == "" {
		return true
	}
	var dl net.Dialer
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := dl.DialContext(cctx, "tcp", net.JoinHostPort(ip, "22"))
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

// Shutdown asks the guest, through the agent session, to power itself off,
// and returns the method the guest used.
func (s *Supervisor) Shutdown(ctx context.Context) (string, error) {
	c, err := s.Session(ctx)
	if err != nil {
		return "", err
	}
	method, err := c.Shutdown(ctx)
	if err != nil {
		s.DropSession(c)
	}
	return method, err
}
