package fake

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// BootIDLine starts the console line on which the fake guest names its
// boot (random per InstanceStart). A restored guest prints RestoredLine
// with the same id: that is how tests see that its "memory" came back.
const (
	BootIDLine   = "banger fake guest: boot id "
	RestoredLine = "banger fake guest: restored boot id "
)

// stateFormat names the fake's microVM state file format. Real Firecracker
// writes a versioned binary format with a CRC; the fake writes JSON with a
// SHA-256 of its body and refuses a file whose sum does not match.
const stateFormat = "banger-fake-firecracker-vmstate/1"

// guestState is the fake guest's "memory": what a restore brings back.
type guestState struct {
	BootID string `json:"boot_id"`
	// UptimeMS is how long the guest has run (paused time excluded).
	UptimeMS int64 `json:"uptime_ms"`
}

// vmState is the microVM state a snapshot file holds: the devices, which
// a restore recreates as they were (paths as they were given).
type vmState struct {
	Machine  map[string]any            `json:"machine"`
	Drives   map[string]map[string]any `json:"drives"`
	Ifaces   map[string]map[string]any `json:"ifaces"`
	VsockUDS string                    `json:"vsock_uds,omitempty"`
	VsockCID json.Number               `json:"vsock_cid,omitempty"`
}

type stateFile struct {
	Format string          `json:"format"`
	SHA256 string          `json:"sha256"`
	State  json.RawMessage `json:"state"`
}

func newBootID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (s *Server) setPaused(paused bool) *fault {
	switch {
	case paused && !s.paused:
		s.guest.UptimeMS += time.Since(s.resumedAt).Milliseconds()
	case !paused && s.paused:
		s.resumedAt = time.Now()
	}
	s.paused = paused
	return nil
}

func (s *Server) memBytes() int64 {
	mib, _ := s.machine["mem_size_mib"].(json.Number).Int64()
	return mib << 20
}

// createSnapshot writes the state file and the memory file, as Firecracker
// does: both are created or truncated, in existing directories, and only
// from a paused microVM.
func (s *Server) createSnapshot(doc map[string]any) *fault {
	if !s.paused {
		return badRequest("Create snapshot error: the microVM must be paused (PATCH /vm {\"state\": \"Paused\"}) before a snapshot is created.")
	}
	if t, _ := doc["snapshot_type"].(string); t == "Diff" {
		if track, _ := s.machine["track_dirty_pages"].(bool); !track {
			return badRequest("Diff snapshots are not allowed on uVMs with dirty page tracking disabled.")
		}
	}
	body, err := json.Marshal(vmState{Machine: s.machine, Drives: s.drives, Ifaces: s.ifaces, VsockUDS: s.vsockPath, VsockCID: s.vsockCID})
	if err != nil {
		return badRequest("Create snapshot error: encode state: %v", err)
	}
	sum := sha256.Sum256(body)
	file, err := json.Marshal(stateFile{Format: stateFormat, SHA256: hex.EncodeToString(sum[:]), State: body})
	if err != nil {
		return badRequest("Create snapshot error: encode state: %v", err)
	}
	if err := writeFile(doc["snapshot_path"].(string), file, 0); err != nil {
		return badRequest("Create snapshot error: Cannot write the microVM state: %v", err)
	}
	mem, err := json.Marshal(s.guest)
	if err != nil {
		return badRequest("Create snapshot error: encode memory: %v", err)
	}
	if err := writeFile(doc["mem_file_path"].(string), append(mem, '\n'), s.memBytes()); err != nil {
		return badRequest("Create snapshot error: Cannot write the guest memory: %v", err)
	}
	return nil
}

// writeFile creates or truncates path with data, extended (sparse) to size.
func writeFile(path string, data []byte, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600) //nolint:gosec // the fake writes where the API says, like Firecracker
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil && size > int64(len(data)) {
		err = f.Truncate(size)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// loadSnapshot restores a snapshot into this fresh process.
func (s *Server) loadSnapshot(doc map[string]any) *fault {
	switch {
	case s.started:
		return badRequest(msgAfterBoot)
	case s.configured:
		return badRequest("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
	}
	memPath, hasFile := doc["mem_file_path"].(string)
	backend, hasBackend := doc["mem_backend"].(map[string]any)
	switch {
	case hasFile && hasBackend:
		return badRequest("Load snapshot error: mem_file_path and mem_backend are mutually exclusive.")
	case !hasFile && !hasBackend:
		return badRequest("Load snapshot error: one of mem_file_path or mem_backend is required.")
	case hasBackend && backend["backend_type"] != "File":
		return badRequest("banger's fake firecracker does not implement the %v memory backend", backend["backend_type"])
	case hasBackend:
		memPath = backend["backend_path"].(string)
	}
	if hp, _ := doc["huge_pages"].(string); hp == "2M" {
		return badRequest("Load snapshot error: explicit huge pages need a Uffd memory backend.")
	}
	st, err := readState(doc["snapshot_path"].(string))
	if err != nil {
		return badRequest("Load snapshot error: Failed to restore from the snapshot: %v", err)
	}
	mib, _ := st.Machine["mem_size_mib"].(json.Number).Int64()
	guest, err := readMemory(memPath, mib<<20)
	if err != nil {
		return badRequest("Load snapshot error: Failed to load guest memory: %v", err)
	}
	for id, d := range st.Drives {
		if p, ok := d["path_on_host"].(string); ok {
			if err := readable(p); err != nil {
				return badRequest("Load snapshot error: Failed to restore from the snapshot: block device %s: %v", id, err)
			}
		}
	}
	overrides, _ := doc["network_overrides"].([]any)
	for _, o := range overrides {
		ov := o.(map[string]any)
		id, tap := ov["iface_id"].(string), ov["host_dev_name"].(string)
		ni, ok := st.Ifaces[id]
		if !ok {
			return badRequest("Load snapshot error: Invalid network override: the snapshot has no network interface %q", id)
		}
		ni["host_dev_name"] = tap
	}
	for id, ni := range st.Ifaces {
		tap, _ := ni["host_dev_name"].(string)
		if s.opts.CheckTap {
			if _, err := os.Stat("/sys/class/net/" + tap); err != nil {
				return badRequest("Load snapshot error: Failed to restore from the snapshot: network interface %s: Open tap device failed: %v", id, err)
			}
		}
	}
	uds := st.VsockUDS
	if vo, ok := doc["vsock_override"].(map[string]any); ok {
		if uds == "" {
			return badRequest("Load snapshot error: vsock_override given but the snapshot has no vsock device")
		}
		uds = vo["uds_path"].(string)
	}
	if uds != "" {
		ln, err := net.Listen("unix", uds)
		if err != nil {
			return badRequest("Load snapshot error: Failed to restore from the snapshot: Cannot create backend for vsock device: %v", err)
		}
		s.vsockLn, s.vsockPath, s.vsockCID = ln, uds, st.VsockCID
	}
	s.machine, s.drives, s.ifaces = st.Machine, st.Drives, st.Ifaces
	s.boot = map[string]any{}
	s.started, s.paused, s.guest = true, true, guest
	if resume, _ := doc["resume_vm"].(bool); resume {
		_ = s.setPaused(false)
	}
	fmt.Fprintf(s.opts.Console, "%s%s (uptime %d ms)\n", RestoredLine, guest.BootID, guest.UptimeMS)
	if s.vsockLn != nil {
		go s.acceptVsock(s.vsockLn)
	}
	return nil
}

func readState(path string) (vmState, error) {
	b, err := os.ReadFile(path) //nolint:gosec // the fake reads what the API names, like Firecracker
	if err != nil {
		return vmState{}, err
	}
	var f stateFile
	if err := json.Unmarshal(b, &f); err != nil || f.Format != stateFormat {
		return vmState{}, fmt.Errorf("%s is not a microVM state file (format %q): %w", path, f.Format, errCorrupt)
	}
	sum := sha256.Sum256(f.State)
	if hex.EncodeToString(sum[:]) != f.SHA256 {
		return vmState{}, fmt.Errorf("%s: checksum mismatch: %w", path, errCorrupt)
	}
	var st vmState
	dec := json.NewDecoder(bytes.NewReader(f.State))
	dec.UseNumber()
	if err := dec.Decode(&st); err != nil {
		return vmState{}, fmt.Errorf("%s: %w: %w", path, errCorrupt, err)
	}
	if _, err := st.Machine["mem_size_mib"].(json.Number).Int64(); err != nil {
		return vmState{}, fmt.Errorf("%s: no memory size: %w", path, errCorrupt)
	}
	if st.Drives == nil {
		st.Drives = map[string]map[string]any{}
	}
	if st.Ifaces == nil {
		st.Ifaces = map[string]map[string]any{}
	}
	return st, nil
}

// readMemory checks the memory file's size against the snapshot's memory
// (Firecracker maps it whole) and reads the fake guest's state from it.
func readMemory(path string, size int64) (guestState, error) {
	f, err := os.Open(path) //nolint:gosec // the fake reads what the API names, like Firecracker
	if err != nil {
		return guestState{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return guestState{}, err
	}
	if fi.Size() != size {
		return guestState{}, fmt.Errorf("memory file %s is %d bytes, the snapshot's guest memory is %d: %w", path, fi.Size(), size, errCorrupt)
	}
	line, err := bufio.NewReader(io.LimitReader(f, 4096)).ReadBytes('\n')
	var g guestState
	if err != nil || json.Unmarshal(line, &g) != nil || g.BootID == "" {
		return guestState{}, fmt.Errorf("memory file %s: guest memory is garbage: %w", path, errCorrupt)
	}
	return g, nil
}

var errCorrupt = fmt.Errorf("corrupt snapshot")
