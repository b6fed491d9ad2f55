// Package progress defines the progress events long operations report, and
// the callback type they report them through. The daemon streams them to the
// CLI as NDJSON; the CLI renders them as bars on a terminal and as plain lines
// otherwise.
package progress

// Event is one progress report of a long operation.
type Event struct {
	Phase   string `json:"phase"`             // e.g. "resolve", "download", "flatten", "mkfs", "ownership", "inject", "publish"
	Item    string `json:"item,omitempty"`    // what the phase works on, e.g. a layer digest
	Message string `json:"message,omitempty"` // human-readable detail
	Current int64  `json:"current,omitempty"` // units done (bytes unless Unit says otherwise)
	Total   int64  `json:"total,omitempty"`   // units in all; 0 when unknown
	Unit    string `json:"unit,omitempty"`    // "bytes" (default when Total>0), "files", ...
	Done    bool   `json:"done,omitempty"`    // the phase (or item) finished
}

// Func receives progress events. It must not block for long; a nil Func
// discards events (call Report to use it safely).
type Func func(Event)

// Report sends ev to f when f is not nil.
func (f Func) Report(ev Event) {
	if f != nil {
		f(ev)
	}
}
