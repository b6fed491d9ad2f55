package guestabi

import "time"

// Init is a choice of the guest's PID 1.
type Init string

// Init choices. A VM asks for one of InitAuto, InitImage or InitBanger
// (banger.init=); the init that runs is InitImage or InitBanger.
const (
	// InitAuto picks InitImage when the image's init is systemd, else
	// InitBanger (the rule is in internal/guestinit).
	InitAuto Init = "auto"
	// InitImage runs the image's own init (/sbin/init, or init=).
	InitImage Init = "image"
	// InitBanger runs banger's PID 1 (InitPath).
	InitBanger Init = "banger"
)

// Valid reports whether i is one of the three choices.
func (i Init) Valid() bool { return i == InitAuto || i == InitImage || i == InitBanger }

// ImageConfig is the part of an OCI image's configuration banger honours.
// The host writes it to ImageConfig in the image at pull time; banger's
// PID 1 runs Entrypoint followed by Cmd as the VM's main process.
type ImageConfig struct {
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	// Env holds KEY=value pairs.
	Env []string `json:"env,omitempty"`
	// WorkingDir is absolute; empty means "/".
	WorkingDir string `json:"working_dir,omitempty"`
	// User is a name or uid, optionally with ":group" (name or gid),
	// resolved in the image's /etc/passwd and /etc/group.
	User string `json:"user,omitempty"`
	// ExposedPorts are "port/proto" strings, e.g. "80/tcp".
	ExposedPorts []string `json:"exposed_ports,omitempty"`
}

// Argv is the main process's command line: Entrypoint then Cmd. Empty
// means the image has no main process.
func (c ImageConfig) Argv() []string {
	return append(append([]string(nil), c.Entrypoint...), c.Cmd...)
}

// MainOverride is what a VM changes in its image's main process
// (vm create --cmd, --env). It travels on the kernel command line
// (banger.main=).
type MainOverride struct {
	// Cmd replaces the image's Cmd (the Entrypoint stays), as docker run's
	// arguments do. Nil keeps the image's.
	Cmd []string `json:"cmd,omitempty"`
	// Env holds KEY=value pairs added to, or replacing, the image's.
	Env []string `json:"env,omitempty"`
}

// Empty reports whether o changes nothing.
func (o MainOverride) Empty() bool { return o.Cmd == nil && len(o.Env) == 0 }

// Apply returns c with o applied.
func (o MainOverride) Apply(c ImageConfig) ImageConfig {
	if o.Cmd != nil {
		c.Cmd = append([]string(nil), o.Cmd...)
	}
	if len(o.Env) > 0 {
		c.Env = MergeEnv(c.Env, o.Env)
	}
	return c
}

// MergeEnv returns base with every KEY=value of over set, keeping base's
// order and appending new keys in over's order.
func MergeEnv(base, over []string) []string {
	key := func(kv string) string {
		for i := 0; i < len(kv); i++ {
			if kv[i] == '=' {
				return kv[:i]
			}
		}
		return kv
	}
	out := append([]string(nil), base...)
	idx := map[string]int{}
	for i, kv := range out {
		idx[key(kv)] = i
	}
	for _, kv := range over {
		if i, ok := idx[key(kv)]; ok {
			out[i] = kv
			continue
		}
		idx[key(kv)] = len(out)
		out = append(out, kv)
	}
	return out
}

// MainStatus is the life of the main process.
type MainStatus string

// Main process states.
const (
	MainNone     MainStatus = "none"     // the image has no main process
	MainRunning  MainStatus = "running"  // started, not exited
	MainExited   MainStatus = "exited"   // exited; ExitCode or Signal says how
	MainFailed   MainStatus = "failed"   // could not be started; Error says why
	MainStarting MainStatus = "starting" // being set up
)

// MainState is what banger's PID 1 writes to MainStateFile, and the agent
// reports.
type MainState struct {
	Status MainStatus `json:"status"`
	Argv   []string   `json:"argv,omitempty"`
	PID    int        `json:"pid,omitempty"`
	// ExitCode is set once the process has exited normally.
	ExitCode *int `json:"exit_code,omitempty"`
	// Signal names the signal that killed it, e.g. "killed".
	Signal    string    `json:"signal,omitempty"`
	Error     string    `json:"error,omitempty"`
	StartedAt time.Time `json:"started_at,omitzero"`
	ExitedAt  time.Time `json:"exited_at,omitzero"`
}
