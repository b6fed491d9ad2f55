package daemon

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
)

// The access endpoints (exec, cp, ssh over the agent) turn the API
// connection into a byte stream relayed to one stream of the VM's agent
// session. The daemon authorizes (the VM's owner or root; anyone else gets
// "not found"), validates, opens the stream with a request it builds
// itself, and from then on copies bytes: nothing the client sends reaches a
// host shell or a host path.

// accessRoutes adds the access endpoints to the route table.
func (d *Daemon) accessRoutes(m *http.ServeMux, p string) {
	m.HandleFunc("POST "+p+"/vms/{name}/exec", d.handleVMExec)
	m.HandleFunc("POST "+p+"/vms/{name}/cp/in", d.handleVMCopy(agent.OpCopyIn))
	m.HandleFunc("POST "+p+"/vms/{name}/cp/out", d.handleVMCopy(agent.OpCopyOut))
	m.HandleFunc("POST "+p+"/vms/{name}/ssh", d.handleVMSSH)
}

func (d *Daemon) handleVMExec(w http.ResponseWriter, r *http.Request) {
	var req api.ExecRequest
	if err := decodeBody(r, &req); err != nil {
		d.writeError(w, r, err)
		return
	}
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		d.writeError(w, r, invalid("exec: no command given: banger exec VM -- COMMAND [ARGS...]"))
		return
	}
	d.relay(w, r, agent.Request{Op: agent.OpExec, Exec: &agent.ExecRequest{
		Argv: req.Argv, TTY: req.TTY, Rows: req.Rows, Cols: req.Cols, Term: req.Term,
		Stdin: req.Stdin, User: req.User, Dir: req.Dir, Env: req.Env,
	}})
}

func (d *Daemon) handleVMCopy(op string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req api.CopyRequest
		if err := decodeBody(r, &req); err != nil {
			d.writeError(w, r, err)
			return
		}
		if req.Path == "" {
			d.writeError(w, r, invalid("cp: no guest path given"))
			return
		}
		// Owners recorded in the stream are kept only for root: anyone
		// else's files belong to the target user in the guest.
		keep := CallerFrom(r.Context()).Root()
		d.relay(w, r, agent.Request{Op: op, Copy: &agent.CopyRequest{Path: req.Path, User: req.User, KeepOwner: keep}})
	}
}

func (d *Daemon) handleVMSSH(w http.ResponseWriter, r *http.Request) {
	d.relay(w, r, agent.Request{Op: agent.OpSSH})
}

// relay authorizes the caller for the VM, opens the agent stream for req,
// answers 101 and copies bytes both ways until either side ends.
func (d *Daemon) relay(w http.ResponseWriter, r *http.Request, req agent.Request) {
	d.relayWith(w, r, req.Op, func(ctx context.Context, vm model.VM) (net.Conn, error) {
		return d.openAgentStream(ctx, vm, req)
	}, pipe)
}

// relayWith is relay with the VM's side opened by open (once the caller is
// authorized and the VM is running) and the bytes copied by copyFn; op
// names the stream in the log.
func (d *Daemon) relayWith(w http.ResponseWriter, r *http.Request, op string, open func(ctx context.Context, vm model.VM) (net.Conn, error), copyFn func(client net.Conn, clientR io.Reader, stream net.Conn)) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), api.StreamProtocol) {
		d.writeError(w, r, invalid("this endpoint needs Upgrade: %s (use the banger CLI)", api.StreamProtocol))
		return
	}
	vm, err := d.visibleVM(r, r.PathValue("name"))
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	if vm.State != model.VMRunning {
		d.writeError(w, r, notRunning(vm))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 20*time.Second)
	stream, err := open(ctx, vm)
	cancel()
	if err != nil {
		d.writeError(w, r, err)
		return
	}
	defer stream.Close()
	hj, ok := w.(http.Hijacker)
	if !ok {
		d.writeError(w, r, errors.New("the API connection cannot be upgraded"))
		return
	}
	w.Header().Set("Connection", "Upgrade")
	w.Header().Set("Upgrade", api.StreamProtocol)
	w.WriteHeader(http.StatusSwitchingProtocols)
	conn, brw, err := hj.Hijack()
	if err != nil {
		d.log.Error("hijack API connection", "vm", vm.Name, "err", err)
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Time{})
	c := CallerFrom(r.Context())
	d.log.Info("agent stream opened", "vm", vm.Name, "op", op, "uid", c.UID)
	start := time.Now()
	var client io.Reader = conn
	if n := brw.Reader.Buffered(); n > 0 {
		client = io.MultiReader(io.LimitReader(brw.Reader, int64(n)), conn)
	}
	copyFn(conn, client, stream)
	d.log.Info("agent stream closed", "vm", vm.Name, "op", op, "uid", c.UID, "duration", time.Since(start).Round(time.Millisecond))
}

// pipe copies between the client and the agent stream until one direction
// ends, then closes both, so that neither side waits on the other: a
// client that goes away ends the guest side (an exec'd process is hung
// up), and a guest that finishes or dies ends the client's connection.
func pipe(client net.Conn, clientR io.Reader, stream net.Conn) {
	var once sync.Once
	done := make(chan struct{})
	end := func() {
		once.Do(func() {
			_ = client.Close()
			_ = stream.Close()
			close(done)
		})
	}
	go func() {
		_, _ = io.Copy(stream, clientR)
		end()
	}()
	go func() {
		_, _ = io.Copy(client, stream)
		end()
	}()
	<-done
}

func notRunning(vm model.VM) error {
	switch vm.State {
	case model.VMStarting:
		return api.Errorf(api.CodeConflict, "VM %q is still starting: wait for it (banger vm start --wait %s) and try again", vm.Name, vm.Name)
	case model.VMError:
		return api.Errorf(api.CodeConflict, "VM %q is in error: %s", vm.Name, vm.Reason)
	}
	return api.Errorf(api.CodeConflict, "VM %q is %s: start it with banger vm start %s", vm.Name, vm.State, vm.Name)
}

// openAgentStream opens one stream of the VM's agent session for req. An
// agent without stream services says so with the way out.
func (d *Daemon) openAgentStream(ctx context.Context, vm model.VM, req agent.Request) (net.Conn, error) {
	c, release, err := d.agentSession(ctx, vm)
	if err != nil {
		return nil, api.Errorf(api.CodeConflict, "VM %q: cannot reach its guest agent: %v", vm.Name, err)
	}
	st, err := c.OpenStream(ctx, req)
	if err != nil {
		release(err)
		switch {
		case errors.Is(err, agent.ErrAgentTooOld):
			return nil, api.Errorf(api.CodeConflict, "VM %q: %v (its image: %s, so: banger image refresh-agent %s, and a new VM from it)", vm.Name, err, vm.Image, vm.Image)
		case errors.Is(err, agent.ErrInvalidArgument):
			return nil, api.Errorf(api.CodeInvalid, "%v", err)
		}
		return nil, api.Errorf(api.CodeConflict, "VM %q: %v", vm.Name, err)
	}
	return &releasingConn{Conn: st, release: func() { release(nil) }}, nil
}

// releasingConn hands its session back when the stream closes.
type releasingConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (r *releasingConn) Close() error {
	err := r.Conn.Close()
	r.once.Do(r.release)
	return err
}

// agentSession returns the VM's one agent session, held by its supervisor,
// and a release function to call when done with it (with the error that
// made it unusable, if any, so the next user dials afresh).
func (d *Daemon) agentSession(ctx context.Context, vm model.VM) (*agent.Client, func(error), error) {
	sup := d.life.Supervisor(vm.ID)
	if sup == nil {
		return nil, nil, errors.New("the VM is not supervised (is it running?)")
	}
	c, err := sup.Session(ctx)
	if err != nil {
		return nil, nil, err
	}
	return c, func(err error) {
		if err != nil && !errors.Is(err, agent.ErrInvalidArgument) && !errors.Is(err, agent.ErrAgentTooOld) {
			sup.DropSession(c)
		}
	}, nil
}
