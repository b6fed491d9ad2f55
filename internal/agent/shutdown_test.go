package agent

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

func TestShutdownOp(t *testing.T) {
	for _, tc := range []struct {
		name     string
		poweroff func() (string, error)
		want     string
		wantErr  error
	}{
		{"systemd", func() (string, error) { return "systemd", nil }, "systemd", nil},
		{"unsupported", nil, "", ErrUnknownOp},
		{"fails", func() (string, error) { return "", errors.New("no way") }, "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := NewServer(t.TempDir(), "test")
			called := 0
			if tc.poweroff != nil {
				srv.PowerOff = func() (string, error) { called++; return tc.poweroff() }
			}
			hostEnd, guestEnd := net.Pipe()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			go func() { _ = srv.ServeConn(ctx, guestEnd) }()
			c, err := NewClient(ctx, hostEnd, ClientOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			method, err := c.Shutdown(ctx)
			switch {
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Shutdown() error = %v, want %v", err, tc.wantErr)
				}
			case tc.want == "":
				if err == nil {
					t.Fatalf("Shutdown() = %q, want an error", method)
				}
			default:
				if err != nil || method != tc.want {
					t.Fatalf("Shutdown() = %q, %v; want %q", method, err, tc.want)
				}
			}
			if tc.poweroff != nil && called != 1 {
				t.Fatalf("PowerOff called %d times, want 1", called)
			}
		})
	}
}
