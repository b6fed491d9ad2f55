package failpoint

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParse(t *testing.T) {
	if Parse("") != nil {
		t.Error(`Parse("") armed something`)
	}
	got := Parse("start:vmm, stop:released,,")
	if diff := cmp.Diff(map[string]bool{"start:vmm": true, "stop:released": true}, got); diff != "" {
		t.Errorf("Parse (-want +got):\n%s", diff)
	}
}

func TestInjected(t *testing.T) {
	restore := Arm("start:confirm=error", "start:vmm")
	defer restore()
	if err := Injected("start:confirm"); !errors.Is(err, ErrInjected) {
		t.Errorf("Injected(start:confirm) = %v, want ErrInjected", err)
	}
	if err := Injected("start:vmm"); err != nil {
		t.Errorf("Injected(start:vmm) = %v: a crash failpoint must not inject an error", err)
	}
	restore()
	if err := Injected("start:confirm"); err != nil {
		t.Errorf("after restore: Injected = %v, want nil", err)
	}
}
