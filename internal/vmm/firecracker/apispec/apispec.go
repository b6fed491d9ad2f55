// Package apispec loads Firecracker's Swagger 2.0 API description
// (firecracker.yaml, embedded) and validates requests against it.
//
// Both sides of banger's Firecracker contract use it: the client's contract
// test checks every request the client can send, and the fake Firecracker
// rejects every request that fails it, so neither can drift from the spec.
//
// The validator covers the subset of JSON Schema that Swagger 2.0
// definitions use in this spec: $ref, type, required, properties, enum,
// minimum, maximum, items and additionalProperties. Unknown properties are
// rejected unless a schema sets additionalProperties: that is what real
// Firecracker does (its request types are deserialised with serde's
// deny_unknown_fields), even though Swagger itself would allow them.
package apispec

import (
	"bytes"
	_ "embed" // the spec file
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

//go:embed firecracker.yaml
var firecrackerYAML []byte

// Sentinel errors. Test with errors.Is.
var (
	// ErrUnknownPath means no path in the spec matches the request path.
	ErrUnknownPath = errors.New("no such API path")
	// ErrMethodNotAllowed means the path exists but not with this method.
	ErrMethodNotAllowed = errors.New("method not allowed on API path")
	// ErrInvalidBody means the body does not validate against its schema.
	ErrInvalidBody = errors.New("request body does not match the API spec")
)

// Schema is a Swagger 2.0 schema object, the subset this spec uses.
type Schema struct {
	Ref                  string             `yaml:"$ref"`
	Type                 string             `yaml:"type"`
	Format               string             `yaml:"format"`
	Required             []string           `yaml:"required"`
	Properties           map[string]*Schema `yaml:"properties"`
	Enum                 []any              `yaml:"enum"`
	Minimum              *float64           `yaml:"minimum"`
	Maximum              *float64           `yaml:"maximum"`
	Items                *Schema            `yaml:"items"`
	AdditionalProperties yaml.Node          `yaml:"additionalProperties"`
	ReadOnly             bool               `yaml:"readOnly"`
}

// Parameter is an operation parameter.
type Parameter struct {
	Name     string  `yaml:"name"`
	In       string  `yaml:"in"`
	Required bool    `yaml:"required"`
	Type     string  `yaml:"type"`
	Schema   *Schema `yaml:"schema"`
}

// Operation is one method on one path.
type Operation struct {
	OperationID string      `yaml:"operationId"`
	Parameters  []Parameter `yaml:"parameters"`
}

// Body returns the operation's body parameter, or nil.
func (o *Operation) Body() *Parameter {
	for i := range o.Parameters {
		if o.Parameters[i].In == "body" {
			return &o.Parameters[i]
		}
	}
	return nil
}

// Spec is a parsed API description.
type Spec struct {
	Version     string
	Paths       map[string]map[string]*Operation // path template -> lower-case method -> op
	Definitions map[string]*Schema
}

type document struct {
	Info struct {
		Version string `yaml:"version"`
	} `yaml:"info"`
	Paths       map[string]map[string]*Operation `yaml:"paths"`
	Definitions map[string]*Schema               `yaml:"definitions"`
}

// Load parses the embedded firecracker.yaml.
func Load() (*Spec, error) { return Parse(firecrackerYAML) }

// Raw returns the embedded firecracker.yaml.
func Raw() []byte { return bytes.Clone(firecrackerYAML) }

// Parse parses a Swagger 2.0 document.
func Parse(doc []byte) (*Spec, error) {
	var d document
	if err := yaml.Unmarshal(doc, &d); err != nil {
		return nil, fmt.Errorf("parse Firecracker API spec: %w", err)
	}
	if len(d.Paths) == 0 || len(d.Definitions) == 0 {
		return nil, errors.New("parse Firecracker API spec: no paths or definitions")
	}
	return &Spec{Version: d.Info.Version, Paths: d.Paths, Definitions: d.Definitions}, nil
}

// Match finds the operation for method and a concrete request path, and the
// values of the path's template parameters.
func (s *Spec) Match(method, path string) (*Operation, map[string]string, error) {
	path, _, _ = strings.Cut(path, "?")
	var allowed bool
	for tmpl, ops := range s.Paths {
		params, ok := matchPath(tmpl, path)
		if !ok {
			continue
		}
		allowed = true
		if op, ok := ops[strings.ToLower(method)]; ok {
			return op, params, nil
		}
	}
	if allowed {
		return nil, nil, fmt.Errorf("%s %s: %w", method, path, ErrMethodNotAllowed)
	}
	return nil, nil, fmt.Errorf("%s %s: %w", method, path, ErrUnknownPath)
}

func matchPath(tmpl, path string) (map[string]string, bool) {
	ts := strings.Split(strings.Trim(tmpl, "/"), "/")
	ps := strings.Split(strings.Trim(path, "/"), "/")
	if len(ts) != len(ps) {
		return nil, false
	}
	params := map[string]string{}
	for i := range ts {
		if strings.HasPrefix(ts[i], "{") && strings.HasSuffix(ts[i], "}") {
			if ps[i] == "" {
				return nil, false
			}
			params[strings.Trim(ts[i], "{}")] = ps[i]
			continue
		}
		if ts[i] != ps[i] {
			return nil, false
		}
	}
	return params, true
}

// ValidateRequest checks that method and path name an operation of the
// spec, and that body validates against the operation's body schema. An
// operation without a body parameter must get an empty body.
func (s *Spec) ValidateRequest(method, path string, body []byte) (*Operation, error) {
	op, _, err := s.Match(method, path)
	if err != nil {
		return nil, err
	}
	bp := op.Body()
	empty := len(bytes.TrimSpace(body)) == 0
	switch {
	case bp == nil && !empty:
		return op, fmt.Errorf("%s %s takes no body: %w", method, path, ErrInvalidBody)
	case bp == nil:
		return op, nil
	case empty && bp.Required:
		return op, fmt.Errorf("%s %s: body is required: %w", method, path, ErrInvalidBody)
	case empty:
		return op, nil
	}
	if err := s.ValidateJSON(bp.Schema, body); err != nil {
		return op, fmt.Errorf("%s %s: %w", method, path, err)
	}
	return op, nil
}

// ValidateJSON validates a JSON document against schema.
func (s *Spec) ValidateJSON(schema *Schema, doc []byte) error {
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return fmt.Errorf("decode JSON: %v: %w", err, ErrInvalidBody) //nolint:errorlint // one %w: the kind
	}
	if dec.More() {
		return fmt.Errorf("trailing data after JSON value: %w", ErrInvalidBody)
	}
	return s.validate(schema, v, "body")
}

// Definition returns the named definition, or nil.
func (s *Spec) Definition(name string) *Schema { return s.Definitions[name] }

func (s *Spec) resolve(sc *Schema) (*Schema, error) {
	for seen := 0; sc != nil && sc.Ref != ""; seen++ {
		if seen > 32 {
			return nil, fmt.Errorf("$ref loop at %s", sc.Ref)
		}
		name, ok := strings.CutPrefix(sc.Ref, "#/definitions/")
		if !ok {
			return nil, fmt.Errorf("unsupported $ref %q", sc.Ref)
		}
		def := s.Definitions[name]
		if def == nil {
			return nil, fmt.Errorf("$ref %q: no such definition", sc.Ref)
		}
		sc = def
	}
	return sc, nil
}

func (s *Spec) validate(sc *Schema, v any, at string) error {
	sc, err := s.resolve(sc)
	if err != nil {
		return fmt.Errorf("%s: %v: %w", at, err, ErrInvalidBody) //nolint:errorlint // one %w: the kind
	}
	if sc == nil {
		return nil
	}
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%s: %s: %w", at, fmt.Sprintf(format, a...), ErrInvalidBody)
	}
	if v == nil {
		// serde treats an explicit null like an absent optional field.
		return nil
	}
	switch sc.Type {
	case "object", "":
		m, ok := v.(map[string]any)
		if !ok {
			if sc.Type == "" {
				break
			}
			return bad("want an object, got %s", jsonType(v))
		}
		for _, r := range sc.Required {
			if x, ok := m[r]; !ok || x == nil {
				return bad("missing required property %q", r)
			}
		}
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			prop, ok := sc.Properties[k]
			if !ok {
				if sc.AdditionalProperties.Kind == 0 || sc.AdditionalProperties.Value == "false" {
					return bad("unknown property %q", k)
				}
				continue
			}
			if prop.ReadOnly {
				return bad("property %q is read-only", k)
			}
			if err := s.validate(prop, m[k], at+"."+k); err != nil {
				return err
			}
		}
	case "array":
		a, ok := v.([]any)
		if !ok {
			return bad("want an array, got %s", jsonType(v))
		}
		for i, x := range a {
			if err := s.validate(sc.Items, x, fmt.Sprintf("%s[%d]", at, i)); err != nil {
				return err
			}
		}
	case "string":
		if _, ok := v.(string); !ok {
			return bad("want a string, got %s", jsonType(v))
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			return bad("want a boolean, got %s", jsonType(v))
		}
	case "integer", "number":
		n, ok := v.(json.Number)
		if !ok {
			return bad("want %s, got %s", sc.Type, jsonType(v))
		}
		f, ok := new(big.Float).SetString(n.String())
		if !ok {
			return bad("bad number %s", n)
		}
		if sc.Type == "integer" && !f.IsInt() {
			return bad("want an integer, got %s", n)
		}
		// Firecracker's integer fields are sized (u8 to u64, i64); a value
		// beyond 64 bits fails deserialisation there too.
		if sc.Type == "integer" && !fits64(n.String()) {
			return bad("integer %s does not fit in 64 bits", n)
		}
		if sc.Minimum != nil && f.Cmp(big.NewFloat(*sc.Minimum)) < 0 {
			return bad("%s is below the minimum %v", n, *sc.Minimum)
		}
		if sc.Maximum != nil && f.Cmp(big.NewFloat(*sc.Maximum)) > 0 {
			return bad("%s is above the maximum %v", n, *sc.Maximum)
		}
	default:
		return bad("schema type %q is not supported by this validator", sc.Type)
	}
	if len(sc.Enum) > 0 && !inEnum(sc.Enum, v) {
		return bad("%v is not one of %v", v, sc.Enum)
	}
	return nil
}

func fits64(s string) bool {
	i, ok := new(big.Int).SetString(s, 10)
	if !ok {
		return false
	}
	return i.IsInt64() || i.IsUint64()
}

func inEnum(enum []any, v any) bool {
	for _, e := range enum {
		switch x := v.(type) {
		case string:
			if fmt.Sprint(e) == x {
				return true
			}
		case json.Number:
			if fmt.Sprint(e) == x.String() {
				return true
			}
		case bool:
			if b, ok := e.(bool); ok && b == x {
				return true
			}
		}
	}
	return false
}

func jsonType(v any) string {
	switch v.(type) {
	case map[string]any:
		return "an object"
	case []any:
		return "an array"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case json.Number:
		return "a number"
	default:
		return fmt.Sprintf("%T", v)
	}
}
