// Package fake is a stand-in for the Firecracker process on hosts that
// cannot run it (no hardware KVM, no binary). It serves Firecracker's REST
// API on the --api-sock socket and is never laxer than the real thing:
//
//   - every request is validated against the same embedded firecracker.yaml
//     the client is tested against (apispec), and refused with 400 and a
//     fault_message when it does not validate;
//   - it enforces what Firecracker checks beyond the schema: pre-boot-only
//     and post-boot-only operations, path id equal to body id, the kernel,
//     initrd and drive files exist, one root drive, the vsock socket path is
//     free, InstanceStart once and only with a boot source, SendCtrlAltDel
//     only on a running VM;
//   - on InstanceStart it "boots": writes boot lines to stdout (the console
//     log) and accepts host connections on the vsock uds_path, answering
//     "CONNECT <port>\n" with "OK <n>\n" and handing the connection to an
//     agent handler (none: the connection is closed, as Firecracker does
//     when no guest program listens on the port);
//   - SendCtrlAltDel makes it exit 0 shortly after, as Firecracker does
//     when the guest resets the CPU; SIGTERM makes it exit;
//   - snapshots (snapshot.go): PATCH /vm pauses and resumes a booted VM,
//     PUT /snapshot/create writes real state and memory files of a paused
//     VM, PUT /snapshot/load restores them into a fresh process, with the
//     refusals Firecracker documents for each.
//
// The optional tap check (Options.CheckTap) verifies /sys/class/net/<tap>
// at PUT /network-interfaces, where real Firecracker opens the tap.
package fake

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/vmm/firecracker/apispec"
)

// Version is the Firecracker version the fake reports.
const Version = "1.17.0-dev"

// AgentHandler serves one host connection to guest vsock port. It owns conn.
type AgentHandler func(port uint32, conn net.Conn)

// Options configure a fake Firecracker.
type Options struct {
	APISock string
	// Console receives the boot lines (stdout in the binary).
	Console io.Writer
	// CheckTap makes PUT /network-interfaces require /sys/class/net/<tap>.
	CheckTap bool
	// Agent answers host connections on the vsock socket; nil closes them.
	Agent AgentHandler
	// AgentPort, when set, is the only guest port with a listener:
	// connections to other ports are closed without "OK".
	AgentPort uint32
	// ShutdownDelay is how long after SendCtrlAltDel the process exits.
	ShutdownDelay time.Duration
	// ConsoleFlood makes the booted guest write to its console without end
	// (a numbered line after another, as fast as the console takes them),
	// for the console cap's tests. Write errors (EPIPE while no daemon
	// reads the console) are ignored, as the guest's serial port would.
	ConsoleFlood bool
}

// Server is one fake Firecracker instance.
type Server struct {
	opts Options
	spec *apispec.Spec

	mu        sync.Mutex
	started   bool
	machine   map[string]any
	boot      map[string]any
	drives    map[string]map[string]any
	ifaces    map[string]map[string]any
	vsockPath string
	vsockCID  json.Number
	vsockLn   net.Listener
	// configured is set by any pre-boot resource: a snapshot can then no
	// longer be loaded into this process.
	configured bool
	paused     bool
	guest      guestState
	resumedAt  time.Time
	exit       chan struct{}
	exitOnce   sync.Once
}

// New returns a Server for opts.
func New(opts Options) (*Server, error) {
	spec, err := apispec.Load()
	if err != nil {
		return nil, err
	}
	if opts.Console == nil {
		opts.Console = io.Discard
	}
	if opts.ShutdownDelay == 0 {
		opts.ShutdownDelay = 50 * time.Millisecond
	}
	return &Server{
		opts:    opts,
		spec:    spec,
		machine: map[string]any{"vcpu_count": json.Number("1"), "mem_size_mib": json.Number("128"), "smt": false},
		drives:  map[string]map[string]any{},
		ifaces:  map[string]map[string]any{},
		exit:    make(chan struct{}),
	}, nil
}

// Exited is closed when the guest has shut down (after SendCtrlAltDel).
func (s *Server) Exited() <-chan struct{} { return s.exit }

// Serve listens on the API socket and serves until ctx ends or the guest
// shuts down. Like Firecracker, it refuses to start when the socket path
// exists. It removes nothing on exit (neither does Firecracker).
func (s *Server) Serve(ctx context.Context) error {
	ln, err := net.Listen("unix", s.opts.APISock)
	if err != nil {
		return fmt.Errorf("fake firecracker: listen on API socket: %w", err)
	}
	srv := &http.Server{Handler: s, ReadHeaderTimeout: 5 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
	case <-s.exit:
	case err := <-errc:
		return fmt.Errorf("fake firecracker: serve: %w", err)
	}
	_ = srv.Close()
	s.mu.Lock()
	if s.vsockLn != nil {
		_ = s.vsockLn.Close()
	}
	s.mu.Unlock()
	return nil
}

// fault is an API error: status and fault_message.
type fault struct {
	status int
	msg    string
}

func (f *fault) Error() string { return f.msg }

func badRequest(format string, a ...any) *fault {
	return &fault{http.StatusBadRequest, fmt.Sprintf(format, a...)}
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		writeFault(w, badRequest("read body: %v", err))
		return
	}
	op, err := s.spec.ValidateRequest(r.Method, r.URL.Path, body)
	switch {
	case errors.Is(err, apispec.ErrUnknownPath):
		writeFault(w, &fault{http.StatusBadRequest, "Invalid request path: " + err.Error()})
		return
	case errors.Is(err, apispec.ErrMethodNotAllowed):
		writeFault(w, &fault{http.StatusBadRequest, "Invalid request method: " + err.Error()})
		return
	case err != nil:
		writeFault(w, badRequest("%v", err))
		return
	}
	var doc map[string]any
	if len(strings.TrimSpace(string(body))) > 0 {
		dec := json.NewDecoder(strings.NewReader(string(body)))
		dec.UseNumber()
		if err := dec.Decode(&doc); err != nil {
			writeFault(w, badRequest("decode body: %v", err))
			return
		}
	}
	_, params, _ := s.spec.Match(r.Method, r.URL.Path)
	out, f := s.handle(op.OperationID, params, doc)
	if f != nil {
		writeFault(w, f)
		return
	}
	if out == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func writeFault(w http.ResponseWriter, f *fault) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(f.status)
	_ = json.NewEncoder(w).Encode(map[string]string{"fault_message": f.msg})
}

const (
	msgAfterBoot  = "The requested operation is not supported after starting the microVM."
	msgBeforeBoot = "The requested operation is not supported before starting the microVM."
)

// handle applies one validated operation.
func (s *Server) handle(opID string, params map[string]string, doc map[string]any) (any, *fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	preBoot := func() *fault {
		if s.started {
			return badRequest(msgAfterBoot)
		}
		return nil
	}
	switch opID {
	case "describeInstance":
		state := "Not started"
		switch {
		case s.started && s.paused:
			state = "Paused"
		case s.started:
			state = "Running"
		}
		return map[string]string{"app_name": "Firecracker", "id": "anonymous-instance", "state": state, "vmm_version": Version + " (banger fake)"}, nil
	case "getFirecrackerVersion":
		return map[string]string{"firecracker_version": Version}, nil
	case "getMachineConfiguration":
		return s.machine, nil
	case "putMachineConfiguration", "patchMachineConfiguration":
		if f := preBoot(); f != nil {
			return nil, f
		}
		s.configured = true
		return nil, s.machineConfig(opID == "patchMachineConfiguration", doc)
	case "putGuestBootSource":
		if f := preBoot(); f != nil {
			return nil, f
		}
		for k, what := range map[string]string{"kernel_image_path": "kernel", "initrd_path": "initrd"} {
			if p, ok := doc[k].(string); ok {
				if err := readable(p); err != nil {
					return nil, badRequest("The %s file cannot be opened: %v", what, err)
				}
			}
		}
		s.boot = doc
		s.configured = true
		return nil, nil
	case "putGuestDriveByID":
		if f := preBoot(); f != nil {
			return nil, f
		}
		s.configured = true
		return nil, s.drive(params["drive_id"], doc)
	case "putGuestNetworkInterfaceByID":
		if f := preBoot(); f != nil {
			return nil, f
		}
		s.configured = true
		return nil, s.iface(params["iface_id"], doc)
	case "putGuestVsock":
		if f := preBoot(); f != nil {
			return nil, f
		}
		s.configured = true
		return nil, s.vsock(doc)
	case "patchVm":
		if !s.started {
			return nil, badRequest(msgBeforeBoot)
		}
		return nil, s.setPaused(doc["state"] == "Paused")
	case "createSnapshot":
		if !s.started {
			return nil, badRequest(msgBeforeBoot)
		}
		return nil, s.createSnapshot(doc)
	case "loadSnapshot":
		return nil, s.loadSnapshot(doc)
	case "createSyncAction":
		return nil, s.action(doc["action_type"].(string))
	case "patchGuestDriveByID", "patchGuestNetworkInterfaceByID":
		if !s.started {
			return nil, badRequest(msgBeforeBoot)
		}
		return nil, badRequest("banger's fake firecracker does not implement %s", opID)
	default:
		// Valid per the spec but unused by banger: refusing is stricter
		// than Firecracker, never laxer.
		return nil, badRequest("banger's fake firecracker does not implement %s", opID)
	}
}

func (s *Server) machineConfig(patch bool, doc map[string]any) *fault {
	next := map[string]any{"smt": false}
	if patch {
		for k, v := range s.machine {
			next[k] = v
		}
	}
	for k, v := range doc {
		next[k] = v
	}
	vcpus, _ := next["vcpu_count"].(json.Number).Int64()
	mem, err := next["mem_size_mib"].(json.Number).Int64()
	if err != nil || mem <= 0 {
		return badRequest("The memory size (MiB) is invalid.")
	}
	if smt, _ := next["smt"].(bool); smt && vcpus > 1 && vcpus%2 == 1 {
		return badRequest("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
	}
	if hp, _ := next["huge_pages"].(string); hp == "2M" && mem%2 != 0 {
		return badRequest("Memory size must be a multiple of the huge page size.")
	}
	s.machine = next
	return nil
}

func (s *Server) drive(id string, doc map[string]any) *fault {
	if doc["drive_id"] != id {
		return badRequest("The id from the path [%s] does not match the id from the body [%v]!", id, doc["drive_id"])
	}
	_, hasPath := doc["path_on_host"].(string)
	_, hasSocket := doc["socket"].(string)
	switch {
	case hasSocket:
		return badRequest("banger's fake firecracker does not implement vhost-user-block drives")
	case !hasPath:
		return badRequest("Unable to create the block device: path_on_host is required for a virtio-block drive")
	}
	if err := readable(doc["path_on_host"].(string)); err != nil {
		return badRequest("Unable to create the block device: %v", err)
	}
	if root, _ := doc["is_root_device"].(bool); root {
		for other, d := range s.drives {
			if r, _ := d["is_root_device"].(bool); r && other != id {
				return badRequest("A root block device already exists!")
			}
		}
	}
	s.drives[id] = doc
	return nil
}

func (s *Server) iface(id string, doc map[string]any) *fault {
	if doc["iface_id"] != id {
		return badRequest("The id from the path [%s] does not match the id from the body [%v]!", id, doc["iface_id"])
	}
	tap := doc["host_dev_name"].(string)
	if tap == "" || len(tap) > 15 || strings.ContainsAny(tap, "/ \t\n") {
		return badRequest("Open tap device failed: invalid interface name %q", tap)
	}
	if s.opts.CheckTap {
		if _, err := os.Stat("/sys/class/net/" + tap); err != nil {
			return badRequest("Open tap device failed: %v", err)
		}
	}
	if mac, ok := doc["guest_mac"].(string); ok {
		if hw, err := net.ParseMAC(mac); err != nil || len(hw) != 6 {
			return badRequest("Invalid MAC address %q", mac)
		}
	}
	for other, d := range s.ifaces {
		if other != id && d["host_dev_name"] == tap {
			return badRequest("The host device name %s is already in use", tap)
		}
	}
	s.ifaces[id] = doc
	return nil
}

// vsock binds uds_path now, as Firecracker does when it creates the device;
// connections are answered once the guest has booted.
func (s *Server) vsock(doc map[string]any) *fault {
	path := doc["uds_path"].(string)
	if s.vsockLn != nil {
		if path == s.vsockPath {
			return nil
		}
		_ = s.vsockLn.Close()
		s.vsockLn = nil
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return badRequest("Cannot create backend for vsock device: %v", err)
	}
	s.vsockLn, s.vsockPath = ln, path
	s.vsockCID, _ = doc["guest_cid"].(json.Number)
	return nil
}

func (s *Server) action(kind string) *fault {
	switch kind {
	case "InstanceStart":
		if s.started {
			return badRequest("The microVM is already running. InstanceStart can only be called once.")
		}
		if s.boot == nil {
			return badRequest("Cannot start microvm without kernel configuration.")
		}
		s.started = true
		s.bootGuest()
		s.guest = guestState{BootID: newBootID()}
		s.resumedAt = time.Now()
		fmt.Fprintf(s.opts.Console, "%s%s\n", BootIDLine, s.guest.BootID)
		return nil
	case "SendCtrlAltDel":
		if !s.started {
			return badRequest(msgBeforeBoot)
		}
		fmt.Fprintln(s.opts.Console, "reboot: Restarting system (Ctrl-Alt-Del)")
		time.AfterFunc(s.opts.ShutdownDelay, func() { s.exitOnce.Do(func() { close(s.exit) }) })
		return nil
	case "FlushMetrics":
		return badRequest("The metrics system is not initialized.")
	default:
		return badRequest("unknown action %q", kind)
	}
}

func (s *Server) bootGuest() {
	args, _ := s.boot["boot_args"].(string)
	fmt.Fprintf(s.opts.Console, "[    0.000000] Linux version 6.1.0 (banger fake firecracker)\n")
	fmt.Fprintf(s.opts.Console, "[    0.000000] Command line: %s\n", args)
	fmt.Fprintf(s.opts.Console, "[    0.000000] Memory: %vMiB, CPUs: %v\n", s.machine["mem_size_mib"], s.machine["vcpu_count"])
	for id, d := range s.drives {
		fmt.Fprintf(s.opts.Console, "[    0.100000] virtio_blk %s: %v\n", id, d["path_on_host"])
	}
	for id, n := range s.ifaces {
		fmt.Fprintf(s.opts.Console, "[    0.100000] virtio_net %s: tap %v mac %v\n", id, n["host_dev_name"], n["guest_mac"])
	}
	if s.vsockLn != nil {
		go s.acceptVsock(s.vsockLn)
	}
	fmt.Fprintln(s.opts.Console, "banger fake guest: booted")
	if s.opts.ConsoleFlood {
		go s.flood()
	}
}

// flood writes console lines until the guest shuts down.
func (s *Server) flood() {
	line := make([]byte, 0, 128)
	for n := 0; ; n++ {
		select {
		case <-s.exit:
			return
		default:
		}
		line = fmt.Appendf(line[:0], "%s%012d %s\n", FloodLinePrefix, n, strings.Repeat("x", 80))
		if _, err := s.opts.Console.Write(line); err != nil {
			time.Sleep(time.Millisecond)
		}
	}
}

// FloodLinePrefix starts every line Options.ConsoleFlood writes, followed
// by the line's number (12 digits).
const FloodLinePrefix = "flood "

// acceptVsock implements the host-initiated half of Firecracker's hybrid
// vsock: read "CONNECT <port>\n", answer "OK <hostport>\n", then hand over.
func (s *Server) acceptVsock(ln net.Listener) {
	next := uint32(1 << 30)
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		next++
		go s.vsockConn(c, next)
	}
}

func (s *Server) vsockConn(c net.Conn, hostPort uint32) {
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReaderSize(c, 64)
	line, err := br.ReadString('\n')
	if err != nil {
		_ = c.Close()
		return
	}
	port, ok := parseConnect(line)
	if !ok || s.opts.Agent == nil || (s.opts.AgentPort != 0 && port != s.opts.AgentPort) {
		_ = c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	if _, err := fmt.Fprintf(c, "OK %d\n", hostPort); err != nil {
		_ = c.Close()
		return
	}
	s.opts.Agent(port, &bufferedConn{Conn: c, r: br})
}

func parseConnect(line string) (uint32, bool) {
	rest, ok := strings.CutPrefix(line, "CONNECT ")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(rest, "\n"), 10, 32)
	return uint32(n), err == nil
}

// bufferedConn keeps bytes already buffered after the CONNECT line.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func readable(path string) error {
	f, err := os.Open(path) //nolint:gosec // the fake opens what the API names, like Firecracker
	if err != nil {
		return err
	}
	return f.Close()
}
