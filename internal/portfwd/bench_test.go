package portfwd

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testutil"
)

// TestBenchForward measures, on this host, a published port over a real
// agent session (yamux on a socket pair: the stack of a VM without the
// virtio-serial device) against the same traffic straight to the service:
// bulk throughput (BANGER_BENCH_BYTES, default 1 GiB) and the latency of a
// small HTTP request (p50, p99 over 500). Run with
//
//	BANGER_BENCH=1 go test ./internal/portfwd -run TestBenchForward -v -count=1
func TestBenchForward(t *testing.T) {
	testutil.OptIn(t, "BANGER_BENCH", "the port-forward benchmark")
	total := int64(1 << 30)
	if s := os.Getenv("BANGER_BENCH_BYTES"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		total = n
	}
	// A sink that counts what it reads and answers with the count, and a
	// small HTTP server.
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				n, _ := io.Copy(io.Discard, c)
				fmt.Fprintf(c, "%d", n)
			}()
		}
	}()
	httpPort := guestHTTP(t, []byte("ok\n"))
	sess := agentSession(t)
	set := publish(t, sess, Options{}, fmt.Sprintf("0:%d", sink.Addr().(*net.TCPAddr).Port), fmt.Sprintf("0:%d", httpPort))
	direct := sink.Addr().String()
	forwarded := set.Specs()[0].HostAddr().String()

	through := func(addr string) float64 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		buf := make([]byte, 1<<20)
		start := time.Now()
		var sent int64
		for sent < total {
			n := int64(len(buf))
			if total-sent < n {
				n = total - sent
			}
			if _, err := c.Write(buf[:n]); err != nil {
				t.Fatal(err)
			}
			sent += n
		}
		_ = c.(*net.TCPConn).CloseWrite()
		b, err := io.ReadAll(c)
		if err != nil || string(b) != strconv.FormatInt(total, 10) {
			t.Fatalf("sink counted %q, %v; want %d", b, err, total)
		}
		return float64(total) / 1e6 / time.Since(start).Seconds()
	}
	latency := func(addr string) (p50, p99 time.Duration) {
		client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
		var ds []time.Duration
		for i := 0; i < 500; i++ {
			start := time.Now()
			resp, err := client.Get("http://" + addr + "/")
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			ds = append(ds, time.Since(start))
		}
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		return ds[len(ds)/2], ds[len(ds)*99/100]
	}
	dMBs, fMBs := through(direct), through(forwarded)
	d50, d99 := latency(fmt.Sprintf("127.0.0.1:%d", httpPort))
	f50, f99 := latency(set.Specs()[1].HostAddr().String())
	t.Logf("throughput, %d MiB: direct %.0f MB/s, published port over the agent session %.0f MB/s (%.2fx)", total>>20, dMBs, fMBs, fMBs/dMBs)
	t.Logf("small HTTP request (new connection each): direct p50 %s p99 %s; published p50 %s p99 %s (p50 %.1fx)",
		d50.Round(time.Microsecond), d99.Round(time.Microsecond), f50.Round(time.Microsecond), f99.Round(time.Microsecond), float64(f50)/float64(d50))
}
