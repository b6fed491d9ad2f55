package apispec

import (
	"encoding/json"
	"fmt"
	"os"
)

// Case is one request of the shared test corpus (testdata/requests.json):
// the validator's tests and the fake's tests both use it, so the fake is
// checked to refuse everything the spec refuses.
type Case struct {
	Name   string          `json:"name"`
	Method string          `json:"method"`
	Path   string          `json:"path"`
	Body   json.RawMessage `json:"body"`
	Valid  bool            `json:"valid"`
}

// LoadCorpus reads a request corpus file.
func LoadCorpus(path string) ([]Case, error) {
	b, err := os.ReadFile(path) //nolint:gosec // test corpus path
	if err != nil {
		return nil, fmt.Errorf("read request corpus: %w", err)
	}
	var cs []Case
	if err := json.Unmarshal(b, &cs); err != nil {
		return nil, fmt.Errorf("parse request corpus %s: %w", path, err)
	}
	return cs, nil
}
