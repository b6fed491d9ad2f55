package agent

import (
	"context"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerdev/banger/internal/guestabi"
)

func TestStatusInitAndMain(t *testing.T) {
	s := newTestServer(t)
	if st := s.status(context.Background()); st.Init != "" || st.Main != nil {
		t.Errorf("no init files: init %q main %+v, want nothing", st.Init, st.Main)
	}
	writeGuestFile(t, s.Root, "proc/1/comm", "systemd\n")
	if st := s.status(context.Background()); st.Init != guestabi.InitImage || st.Main != nil {
		t.Errorf("systemd guest: init %q main %+v, want image and no main", st.Init, st.Main)
	}
	writeGuestFile(t, s.Root, guestabi.InitFile, "banger\n")
	if st := s.status(context.Background()); st.Init != guestabi.InitBanger || st.Main != nil {
		t.Errorf("banger init, no main yet: init %q main %+v", st.Init, st.Main)
	}
	writeGuestFile(t, s.Root, guestabi.MainStateFile, `{"status":"exited","pid":42,"exit_code":3,"argv":["sh"]}`)
	code := 3
	want := &guestabi.MainState{Status: guestabi.MainExited, PID: 42, ExitCode: &code, Argv: []string{"sh"}}
	if diff := cmp.Diff(want, s.status(context.Background()).Main); diff != "" {
		t.Errorf("main state (-want +got):\n%s", diff)
	}
	writeGuestFile(t, s.Root, guestabi.MainStateFile, `{garbage`)
	if st := s.status(context.Background()); st.Init != guestabi.InitBanger || st.Main != nil {
		t.Errorf("corrupt main state: %+v, want banger and no main", st.Main)
	}
}
