package portfwd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
)

// agentSession runs a real agent server with the port-forward service on
// one end of a socket pair and returns the upgraded client on the other:
// the same yamux session the daemon holds to a VM.
func agentSession(t *testing.T) *agent.Client {
	t.Helper()
	srv := agent.NewServer(t.TempDir(), "test")
	srv.Services = map[string]agent.StreamService{ServiceName: (&Guest{}).ServeStream}
	host, guest, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.ServeConn(ctx, guest)
	}()
	hctx, hcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer hcancel()
	c, err := agent.NewClient(hctx, host, agent.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Upgrade(hctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Close()
		cancel()
		<-done
	})
	return c
}

func TestForwardOverAgentSession(t *testing.T) {
	c := agentSession(t)
	body := make([]byte, 2<<20)
	for i := range body {
		body[i] = byte(i * 7)
	}
	port := guestHTTP(t, body)
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := closed.Addr().(*net.TCPAddr).Port
	_ = closed.Close()
	udpPort := guestUDPEcho(t)
	set := publish(t, c, Options{}, fmt.Sprintf("0:%d", port), fmt.Sprintf("0:%d", closedPort), fmt.Sprintf("0:%d/udp", udpPort))
	specs := set.Specs()

	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	for i := 0; i < 4; i++ {
		resp, err := client.Get(fmt.Sprintf("http://%s/", specs[0].HostAddr()))
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if err != nil || len(b) != len(body) || string(b) != string(body) {
			t.Fatalf("GET over the agent session: %d bytes, %v", len(b), err)
		}
	}
	conn, err := net.Dial("tcp", specs[1].HostAddr().String())
	if err == nil {
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		_ = conn.Close()
	}
	if !errors.Is(err, syscall.ECONNRESET) || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("forward to a closed guest port over the agent session: %v; want a reset", err)
	}
	u, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(specs[2].HostAddr()))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	udpRoundTrip(t, u, "over yamux")
}
