package model

import (
	"reflect"
	"testing"
)

// setLeaf makes the leaf field at path of v (a pointer to a struct) differ
// from its zero value, and reports whether it knew how.
func setLeaf(t *testing.T, f reflect.Value, path string) {
	t.Helper()
	switch f.Kind() {
	case reflect.String:
		f.SetString("x")
	case reflect.Int, reflect.Int64:
		f.SetInt(7)
	case reflect.Uint32, reflect.Uint64:
		f.SetUint(7)
	case reflect.Bool:
		f.SetBool(true)
	case reflect.Slice:
		s := reflect.MakeSlice(f.Type(), 1, 1)
		if s.Index(0).Kind() == reflect.Struct {
			s.Index(0).Field(0).SetString("x")
		} else {
			s.Index(0).SetString("x")
		}
		f.Set(s)
	default:
		t.Fatalf("field %s has kind %s: teach this test to set it", path, f.Kind())
	}
}

// leaves calls fn with every leaf field of the struct type typ (nested
// structs are walked), by index path.
func leaves(typ reflect.Type, prefix string, idx []int, fn func(path string, idx []int)) {
	for i := range typ.NumField() {
		f := typ.Field(i)
		p := prefix + f.Name
		ix := append(append([]int(nil), idx...), i)
		if f.Type.Kind() == reflect.Struct {
			leaves(f.Type, p+".", ix, fn)
			continue
		}
		fn(p, ix)
	}
}

// TestSameIdentityChecksEveryField changes each field of Runtime and of its
// parts (the monitor handle, the disk, the tap) in turn: SameIdentity must
// notice every one. A field added to any of them and not compared fails
// here.
func TestSameIdentityChecksEveryField(t *testing.T) {
	var base Runtime
	if !base.SameIdentity(base) {
		t.Fatal("a runtime is not the same identity as itself")
	}
	n := 0
	leaves(reflect.TypeOf(base), "", nil, func(path string, idx []int) {
		n++
		var changed Runtime
		setLeaf(t, reflect.ValueOf(&changed).Elem().FieldByIndex(idx), path)
		if base.SameIdentity(changed) || changed.SameIdentity(base) {
			t.Errorf("SameIdentity ignores Runtime.%s", path)
		}
		if !changed.SameIdentity(changed) {
			t.Errorf("a runtime with %s set is not the same identity as itself", path)
		}
	})
	if n < 20 {
		t.Fatalf("walked %d fields of Runtime, want the monitor's, the disk's and the tap's too", n)
	}
}

// TestEmptyCountsEveryResource: a runtime holding any resource field is
// not empty; only the phase and the console log name none.
func TestEmptyCountsEveryResource(t *testing.T) {
	leaves(reflect.TypeOf(Runtime{}), "", nil, func(path string, idx []int) {
		var rt Runtime
		setLeaf(t, reflect.ValueOf(&rt).Elem().FieldByIndex(idx), path)
		want := path == "Phase" || path == "ConsoleLog"
		if got := rt.Empty(); got != want {
			t.Errorf("Runtime{%s: set}.Empty() = %v, want %v", path, got, want)
		}
	})
}
