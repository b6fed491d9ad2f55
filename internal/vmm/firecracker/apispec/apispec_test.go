package apispec

import (
	"bytes"
	"errors"
	"os"
	"testing"
)

// TestEmbeddedSpecMatchesSharedCopy checks the embedded spec against the
// project's copy of the Firecracker API spec (shared/firecracker next to
// the repository; BANGER_FIRECRACKER_SPEC names another). A missing spec
// fails the test: the fake and the client are checked against it.
func TestEmbeddedSpecMatchesSharedCopy(t *testing.T) {
	shared := os.Getenv("BANGER_FIRECRACKER_SPEC")
	if shared == "" {
		shared = "../../../../../shared/firecracker/firecracker.yaml"
	}
	b, err := os.ReadFile(shared)
	if err != nil {
		t.Fatalf("the Firecracker API spec is absent (%v): set BANGER_FIRECRACKER_SPEC to its path", err)
	}
	if !bytes.Equal(b, Raw()) {
		t.Fatalf("embedded firecracker.yaml differs from %s: copy it again", shared)
	}
}

func TestLoad(t *testing.T) {
	s, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	if s.Version != "1.17.0-dev" {
		t.Errorf("Version = %q, want 1.17.0-dev", s.Version)
	}
	for _, def := range []string{"MachineConfiguration", "BootSource", "Drive", "NetworkInterface", "Vsock", "InstanceActionInfo"} {
		if s.Definition(def) == nil {
			t.Errorf("definition %s missing", def)
		}
	}
	// Every $ref in every definition resolves.
	for name, d := range s.Definitions {
		for prop, p := range d.Properties {
			if _, err := s.resolve(p); err != nil {
				t.Errorf("%s.%s: %v", name, prop, err)
			}
		}
	}
}

func TestValidateCorpus(t *testing.T) {
	s, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	cases, err := LoadCorpus("testdata/requests.json")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			_, err := s.ValidateRequest(c.Method, c.Path, c.Body)
			if c.Valid && err != nil {
				t.Fatalf("ValidateRequest(%s %s, %s) = %v, want valid", c.Method, c.Path, c.Body, err)
			}
			if !c.Valid && err == nil {
				t.Fatalf("ValidateRequest(%s %s, %s) = nil, want an error", c.Method, c.Path, c.Body)
			}
		})
	}
}

func TestErrorKinds(t *testing.T) {
	s, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		method, path, body string
		want               error
	}{
		{"PUT", "/nope", "{}", ErrUnknownPath},
		{"DELETE", "/vsock", "", ErrMethodNotAllowed},
		{"PUT", "/vsock", `{"guest_cid": 3}`, ErrInvalidBody},
		{"PUT", "/vsock", `{"guest_cid": 3, "uds_path": "/x"} {}`, ErrInvalidBody},
		{"PUT", "/vsock", `{"guest_cid": 3, "uds_path": "/x"`, ErrInvalidBody},
	}
	for _, tt := range tests {
		_, err := s.ValidateRequest(tt.method, tt.path, []byte(tt.body))
		if !errors.Is(err, tt.want) {
			t.Errorf("ValidateRequest(%s %s, %s) = %v, want %v", tt.method, tt.path, tt.body, err, tt.want)
		}
	}
}

func TestMatchPathParams(t *testing.T) {
	s, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	op, params, err := s.Match("PUT", "/drives/rootfs")
	if err != nil {
		t.Fatal(err)
	}
	if op.OperationID != "putGuestDriveByID" || params["drive_id"] != "rootfs" {
		t.Fatalf("Match(PUT /drives/rootfs) = %s %v", op.OperationID, params)
	}
	if _, _, err := s.Match("PUT", "/drives/a/b"); !errors.Is(err, ErrUnknownPath) {
		t.Fatalf("Match(PUT /drives/a/b) = %v, want ErrUnknownPath", err)
	}
}
