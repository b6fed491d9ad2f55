// Package agent is banger's guest agent: the wire protocol, the host-side
// client the daemon uses to reach a VM, and the guest-side server that
// cmd/banger-vsock-agent runs inside the VM.
//
// # Wire format
//
// Every message is one frame:
//
//	magic "BNGA" | length uint32 BE | crc32c(payload) uint32 BE | payload
//
// The payload is a JSON object carrying the protocol version ("v"), a
// request id ("id") and an operation ("op"). A payload is at most
// MaxFrameSize bytes; both ends refuse a larger frame before reading it.
// Neither end trusts the other: the host treats everything a guest says as
// untrusted input, and the agent validates every request.
//
// On connection-oriented transports (vsock, Firecracker's vsock Unix socket)
// a malformed frame ends the connection. A virtio-serial port is one byte
// stream that outlives host connections, so there the reader resynchronises:
// it discards bytes until a valid magic, length and checksum line up, and
// drops a half-received frame that does not complete in time. The host
// opens every session with a "hello" carrying a random nonce and ignores
// every frame until the agent echoes that nonce, so replies meant for an
// earlier host connection are never mistaken for its own.
//
// # Operations
//
//   - hello: echoes the nonce; confirms the protocol version.
//   - health: agent version, uptime, hostname.
//   - status: first-boot state and log tail, IPv4 addresses, SSH host key.
//   - authorize_key: installs one SSH public key into root's authorized_keys.
//   - mux: the agent answers, then both ends speak yamux on the same
//     connection. Every later request, framed as above, opens its own yamux
//     stream: health, status, authorize_key and shutdown get one reply and
//     the stream closes; exec, copy_in, copy_out and ssh get an empty reply
//     and the stream carries that service from then on (streams.go). An
//     agent from before mux answers unknown_op: the host then reports
//     ErrAgentTooOld for those services and keeps using the framed ones.
//   - shutdown: powers the guest off cleanly (asks systemd, else syncs and
//     powers off); the reply comes first. Added in agent protocol v1 without
//     a version bump: an older agent answers unknown_op and the host falls
//     back to the monitor's own shutdown request.
//   - set_identity: a restored clone's own identity (identity.go).
//
// # Transports
//
// The agent listens on AF_VSOCK port DefaultPort when /dev/vsock exists and
// on the virtio-serial port named SerialPortName when it exists. The host
// reaches it through Firecracker's vsock Unix socket (TransportVsockUDS), a
// kernel AF_VSOCK socket (TransportVsock) or QEMU's virtio-serial Unix-socket
// chardev (TransportVirtioSerial).
package agent

import (
	"errors"
	"fmt"
	"time"

	"github.com/bangerdev/banger/internal/guestabi"
)

// ProtocolVersion is the version of the wire protocol this package speaks.
// Both ends refuse a message with another version.
const ProtocolVersion = 1

// DefaultPort is the AF_VSOCK port the agent listens on.
const DefaultPort = guestabi.AgentVsockPort

// SerialPortName is the name of the virtio-serial port the agent serves on
// (QEMU: -device virtserialport,name=org.banger.agent).
const SerialPortName = guestabi.AgentSerialPort

// MaxFrameSize is the largest payload either end accepts, in bytes.
const MaxFrameSize = 64 << 10

// Operation names.
const (
	OpHello        = "hello"
	OpHealth       = "health"
	OpStatus       = "status"
	OpAuthorizeKey = "authorize_key"
	OpShutdown     = "shutdown"
	// OpMux turns the connection into a yamux session (see mux.go).
	OpMux = "mux"
	// Stream operations: each opens one yamux stream (see streams.go).
	OpExec    = "exec"
	OpCopyIn  = "copy_in"
	OpCopyOut = "copy_out"
	OpSSH     = "ssh"
)

// Error codes an agent returns in Response.Error.
const (
	CodeVersionMismatch = "version_mismatch"
	CodeUnknownOp       = "unknown_op"
	CodeInvalidArgument = "invalid_argument"
	CodeInternal        = "internal"
)

// Sentinel errors. Errors from this package wrap one of these when the
// cause is of that kind; test with errors.Is.
var (
	// ErrVersionMismatch: the peer speaks another protocol version.
	ErrVersionMismatch = errors.New("agent protocol version mismatch")
	// ErrFrameTooLarge: a frame exceeds MaxFrameSize.
	ErrFrameTooLarge = errors.New("agent frame too large")
	// ErrBadFrame: a frame has a wrong magic, checksum or payload.
	ErrBadFrame = errors.New("malformed agent frame")
	// ErrUnknownOp: the agent does not know the operation.
	ErrUnknownOp = errors.New("unknown agent operation")
	// ErrInvalidArgument: the agent rejected a request's argument.
	ErrInvalidArgument = errors.New("invalid agent request argument")
	// ErrUnknownTransport: Dial was given a transport it does not know.
	ErrUnknownTransport = errors.New("unknown agent transport")
	// ErrConnectRefused: Firecracker closed the vsock Unix socket instead of
	// answering CONNECT with OK (nobody listens on the guest port yet).
	ErrConnectRefused = errors.New("vsock connect refused")
)

// Request is the payload of a host-to-agent frame.
type Request struct {
	V     int    `json:"v"`
	ID    uint64 `json:"id"`
	Op    string `json:"op"`
	Nonce string `json:"nonce,omitempty"` // hello
	Key   string `json:"key,omitempty"`   // authorize_key: one authorized_keys line
	// Identity is set_identity's argument (identity.go).
	Identity *Identity `json:"identity,omitempty"`
	// Exec is the command of an OpExec stream.
	Exec *ExecRequest `json:"exec,omitempty"`
	// Copy is the guest path and user of an OpCopyIn or OpCopyOut stream.
	Copy *CopyRequest `json:"copy,omitempty"`
}

// Response is the payload of an agent-to-host frame. Exactly one of Error
// or the result matching Op is set.
type Response struct {
	V      int           `json:"v"`
	ID     uint64        `json:"id"`
	Op     string        `json:"op,omitempty"`
	Error  *RemoteError  `json:"error,omitempty"`
	Hello  *Hello        `json:"hello,omitempty"`
	Health *Health       `json:"health,omitempty"`
	Status *Status       `json:"status,omitempty"`
	Key    *AuthorizeKey `json:"authorize_key,omitempty"`
	// Shutdown is set in the reply to OpShutdown.
	Shutdown *Shutdown `json:"shutdown,omitempty"`
	// Identity is set in the reply to OpSetIdentity (identity.go).
	Identity *IdentityResult `json:"identity,omitempty"`
	// Mux is set in the reply to OpMux.
	Mux *Mux `json:"mux,omitempty"`

	pending *Request // the accepted request of a stream operation
}

// Mux is the reply to OpMux: after it, both ends speak yamux on the
// connection.
type Mux struct {
	// Streams is the version of the stream protocol (StreamVersion).
	Streams int `json:"streams"`
}

// Shutdown is the reply to OpShutdown.
type Shutdown struct {
	// Method is how the guest is being powered off: "systemd" (SIGRTMIN+4
	// to PID 1, which starts poweroff.target) or "poweroff" (sync and
	// reboot(POWER_OFF)).
	Method string `json:"method"`
}

// RemoteError is an error reported by the agent.
type RemoteError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Error implements error.
func (e *RemoteError) Error() string { return fmt.Sprintf("agent: %s (%s)", e.Message, e.Code) }

// Unwrap maps the code onto this package's sentinel errors.
func (e *RemoteError) Unwrap() error {
	switch e.Code {
	case CodeVersionMismatch:
		return ErrVersionMismatch
	case CodeUnknownOp:
		return ErrUnknownOp
	case CodeInvalidArgument:
		return ErrInvalidArgument
	}
	return nil
}

// Hello is the reply to OpHello.
type Hello struct {
	Nonce string `json:"nonce"`
}

// Health is the reply to OpHealth.
type Health struct {
	// AgentVersion is the agent binary's version string.
	AgentVersion string `json:"agent_version"`
	// Uptime is how long the agent has been running.
	Uptime time.Duration `json:"uptime_ns"`
	// Hostname is the guest's hostname.
	Hostname string `json:"hostname"`
}

// FirstBootState is the progress of the guest's first-boot service
// (guestabi.FirstBootState).
type FirstBootState = guestabi.FirstBootState

// First-boot states, see guestabi.
const (
	FirstBootPending = guestabi.FirstBootPending
	FirstBootRunning = guestabi.FirstBootRunning
	FirstBootDone    = guestabi.FirstBootDone
	FirstBootFailed  = guestabi.FirstBootFailed
	FirstBootSkipped = guestabi.FirstBootSkipped
	FirstBootUnknown = guestabi.FirstBootUnknown
)

// Guest paths the agent reads and writes (absolute guest paths, joined
// under Server.Root), see guestabi.
const (
	FirstBootStatusFile = guestabi.FirstBootStatus
	FirstBootMarkerFile = guestabi.FirstBootMarker
	FirstBootLogFile    = guestabi.FirstBootLog
	HostKeyFile         = guestabi.HostKey
	AuthorizedKeysFile  = guestabi.AuthorizedKeys
)

// FirstBootLogLines is how many trailing lines of the first-boot log Status
// carries; each line is cut to maxLogLineBytes.
const FirstBootLogLines = 20

// Status is the reply to OpStatus.
type Status struct {
	FirstBoot    FirstBootState `json:"first_boot"`
	FirstBootLog []string       `json:"first_boot_log,omitempty"`
	// Addresses are the guest's IPv4 addresses outside loopback.
	Addresses []InterfaceAddr `json:"addresses,omitempty"`
	// HostKey is the guest's ed25519 SSH host key in authorized_keys
	// format, empty when sshd has not generated one yet. It comes from the
	// guest: validate it before pinning it (sshkeys.KnownHostsLine does).
	HostKey string `json:"host_key,omitempty"`
	// Init is the init running the guest (guestabi.InitImage or
	// InitBanger); empty from an older agent. Added without a version bump.
	Init guestabi.Init `json:"init,omitempty"`
	// Main is banger's PID 1's record of the image's main process; nil
	// when the guest runs the image's own init. Untrusted guest data.
	Main *guestabi.MainState `json:"main,omitempty"`
	// Streams is the agent's StreamVersion: it serves exec, cp and ssh
	// over the agent channel (zero from an older agent).
	Streams int `json:"streams,omitempty"`
	// SSHD reports that the image has an sshd binary, so ssh over the
	// network is expected to come up.
	SSHD bool `json:"sshd,omitempty"`
}

// InterfaceAddr is an IPv4 address on a guest interface.
type InterfaceAddr struct {
	Interface string `json:"interface"`
	// CIDR is the address with its prefix length, e.g. "10.0.0.2/24".
	CIDR string `json:"cidr"`
}

// AuthorizeKey is the reply to OpAuthorizeKey.
type AuthorizeKey struct {
	// Added is false when the key was already authorized.
	Added bool `json:"added"`
}
