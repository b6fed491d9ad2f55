// Package api is the contract between the banger CLI and the daemon:
// HTTP/JSON over a Unix socket under /v1/, JSON errors with stable codes, and
// NDJSON streams of progress events for long operations. It holds the wire
// types and the client; package daemon holds the server.
package api

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/bangerdev/banger/internal/progress"
)

// Prefix is the path prefix of this API version.
const Prefix = "/v1"

// ErrorCode is a stable, machine-readable error class.
type ErrorCode string

// The error codes. Their strings are part of the API.
const (
	CodeNotFound    ErrorCode = "not_found"
	CodeConflict    ErrorCode = "conflict"
	CodeInvalid     ErrorCode = "invalid_input"
	CodeForbidden   ErrorCode = "forbidden"
	CodeInternal    ErrorCode = "internal"
	CodeUnavailable ErrorCode = "unavailable" // the daemon cannot be reached
	CodeCanceled    ErrorCode = "canceled"
)

// Error is the JSON body of every failed request, and the error the client
// returns for it.
type Error struct {
	Code    ErrorCode `json:"code"`
	Message string    `json:"message"`
}

func (e *Error) Error() string { return e.Message }

// Is lets errors.Is(err, &api.Error{Code: c}) match on the code alone.
func (e *Error) Is(target error) bool {
	var t *Error
	if errors.As(target, &t) {
		return t.Code == e.Code && (t.Message == "" || t.Message == e.Message)
	}
	return false
}

// Errorf makes an *Error with the given code.
func Errorf(code ErrorCode, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// CodeOf returns the code of err, CodeInternal when err is not an *Error.
func CodeOf(err error) ErrorCode {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return CodeInternal
}

// StreamLine is one line of an NDJSON response stream: progress events,
// then exactly one result or error line.
type StreamLine struct {
	Event  *progress.Event `json:"event,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *Error          `json:"error,omitempty"`
}

// StreamContentType is the content type of streamed responses.
const StreamContentType = "application/x-ndjson"

// VersionInfo answers GET /v1/version.
type VersionInfo struct {
	Version       string `json:"version"`
	Commit        string `json:"commit,omitempty"`
	GoVersion     string `json:"go_version"`
	PID           int    `json:"pid"`
	SchemaVersion int    `json:"schema_version"`
	StateDir      string `json:"state_dir"`
	CacheDir      string `json:"cache_dir"`
	RuntimeDir    string `json:"runtime_dir"`
	CallerUID     uint32 `json:"caller_uid"`
}

// DeleteResult answers a delete.
type DeleteResult struct {
	Deleted string `json:"deleted"`
	Freed   int64  `json:"freed_bytes,omitempty"`
}

// PullRequest is the body of POST /v1/images/pull.
type PullRequest struct {
	Ref       string `json:"ref"`                  // OCI reference or catalog name
	Name      string `json:"name,omitempty"`       // image name; derived from Ref when empty
	KernelRef string `json:"kernel_ref,omitempty"` // kernel to stage beside the image
	Size      string `json:"size,omitempty"`       // ext4 size, e.g. "4G"; content × 1.5 (min 1 GiB) when empty
	Force     bool   `json:"force,omitempty"`      // replace an image of the same name
	Builder   string `json:"builder,omitempty"`    // "direct", "staging" or ""/"auto" (direct, falling back to staging)
}

// PruneResult answers a cache prune.
type PruneResult struct {
	Removed int   `json:"removed_blobs"`
	Freed   int64 `json:"freed_bytes"`
}

// CreateVMRequest is the body of POST /v1/vms.
type CreateVMRequest struct {
	Name      string `json:"name,omitempty"`       // derived from the image when empty
	Image     string `json:"image"`                // image name
	CPUs      int    `json:"cpus,omitempty"`       // default 2
	Memory    string `json:"memory,omitempty"`     // e.g. "1G"; default 1 GiB
	Disk      string `json:"disk,omitempty"`       // e.g. "8G"; default the image's size
	KernelRef string `json:"kernel_ref,omitempty"` // default the image's kernel
	VMM       string `json:"vmm,omitempty"`        // auto, firecracker, qemu
	SSHKey    string `json:"ssh_key,omitempty"`    // public key authorized for root in the guest
	Start     bool   `json:"start,omitempty"`      // start it after creating it
	Wait      bool   `json:"wait,omitempty"`       // with Start: wait until the VM is ready for ssh
	// Init is auto (default), image or banger: which PID 1 the VM boots.
	Init string `json:"init,omitempty"`
	// Cmd replaces the image's Cmd (its Entrypoint stays); nil keeps it.
	Cmd []string `json:"cmd,omitempty"`
	// Env holds KEY=value pairs added to, or replacing, the image's Env.
	Env []string `json:"env,omitempty"`
	// Ports are -p values, [HOSTIP:][HOSTPORT:]GUESTPORT[/tcp|/udp].
	Ports []string `json:"ports,omitempty"`
	// Mounts are --mount values, HOSTDIR:GUESTDIR[:ro] (HOSTDIR absolute).
	Mounts []string `json:"mounts,omitempty"`
}

// StartVMRequest is the body of POST /v1/vms/{name}/start.
type StartVMRequest struct {
	SSHKey string `json:"ssh_key,omitempty"` // replaces the authorized key when set
	Wait   bool   `json:"wait,omitempty"`    // wait until the VM is ready for ssh
	// FromSnapshot restores the VM from this snapshot instead of booting.
	FromSnapshot string `json:"from_snapshot,omitempty"`
}

// KernelPullRequest is the body of POST /v1/kernels/pull.
type KernelPullRequest struct {
	Name  string `json:"name"`
	Force bool   `json:"force,omitempty"`
}

// CatalogListing is one entry of GET /v1/images/catalog: an image catalog
// entry and whether it is pulled here.
type CatalogListing struct {
	// Name is what users pull, e.g. "debian-bookworm".
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	// OS is the distribution inside the image.
	OS struct {
		ID      string `json:"id"`
		Version string `json:"version,omitempty"`
	} `json:"os"`
	// KernelRef names the kernel the image boots with when its bundle
	// carries none.
	KernelRef string `json:"kernel_ref,omitempty"`
	// Bundle is the downloadable bundle.
	Bundle struct {
		URL    string `json:"url"`
		SHA256 string `json:"sha256"`
		Size   int64  `json:"size"`
	} `json:"bundle"`
	// Pulled is true when a local image came from this entry.
	Pulled bool `json:"pulled"`
	// Images are the local images pulled from this entry.
	Images []string `json:"images,omitempty"`
	// Current is true when one of them is the entry's current bundle.
	Current bool `json:"current,omitempty"`
}
