// Command pfclient is the ports test's client inside its network
// namespace (and as a second uid):
//
//	pfclient udp ADDR MESSAGE          send MESSAGE, print the first answer
//	pfclient pull ADDR BYTES           ask blast for BYTES, print {"bytes","seconds"}
//	pfclient latency URL COUNT         COUNT GETs, one connection each, print {"p50_us","p99_us"}
//	pfclient dial SOCKET VM PORT       open POST /v1/vms/VM/port-forward, print "ok" or the API error code
//
// It exits 1 after printing an error.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/bangerdev/banger/internal/api"
)

func fail(err error) {
	fmt.Println(err)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 4 {
		fail(fmt.Errorf("usage: pfclient udp|pull|latency|dial ARGS"))
	}
	switch os.Args[1] {
	case "udp":
		c, err := net.Dial("udp", os.Args[2])
		if err != nil {
			fail(err)
		}
		buf := make([]byte, 65535)
		for try := 0; try < 10; try++ {
			if _, err := c.Write([]byte(os.Args[3])); err != nil {
				fail(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
			if n, err := c.Read(buf); err == nil {
				fmt.Print(string(buf[:n]))
				return
			}
		}
		fail(fmt.Errorf("no answer from %s in 10 tries", os.Args[2]))
	case "pull":
		n, err := strconv.ParseInt(os.Args[3], 10, 64)
		if err != nil {
			fail(err)
		}
		start := time.Now()
		c, err := net.Dial("tcp", os.Args[2])
		if err != nil {
			fail(err)
		}
		if _, err := fmt.Fprintf(c, "%d\n", n); err != nil {
			fail(err)
		}
		got, err := io.CopyBuffer(io.Discard, c, make([]byte, 1<<20))
		if err != nil {
			fail(err)
		}
		if got != n {
			fail(fmt.Errorf("got %d bytes, want %d", got, n))
		}
		_ = json.NewEncoder(os.Stdout).Encode(map[string]float64{"bytes": float64(got), "seconds": time.Since(start).Seconds()})
	case "latency":
		count, err := strconv.Atoi(os.Args[3])
		if err != nil || count < 1 {
			fail(fmt.Errorf("count %q", os.Args[3]))
		}
		client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		var lat []time.Duration
		for i := 0; i < count; i++ {
			s := time.Now()
			r, err := client.Get(os.Args[2])
			if err != nil {
				fail(err)
			}
			_, _ = io.Copy(io.Discard, r.Body)
			_ = r.Body.Close()
			if r.StatusCode != http.StatusOK {
				fail(fmt.Errorf("GET %s: %s", os.Args[2], r.Status))
			}
			lat = append(lat, time.Since(s))
		}
		slices.Sort(lat)
		_ = json.NewEncoder(os.Stdout).Encode(map[string]int64{
			"p50_us": lat[len(lat)/2].Microseconds(), "p99_us": lat[min(len(lat)-1, len(lat)*99/100)].Microseconds(),
		})
	case "dial":
		if len(os.Args) < 5 {
			fail(fmt.Errorf("usage: pfclient dial SOCKET VM PORT"))
		}
		port, err := strconv.ParseUint(os.Args[4], 10, 16)
		if err != nil {
			fail(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := api.NewClient(os.Args[2]).Upgrade(ctx, "/vms/"+os.Args[3]+"/port-forward", api.PortForwardRequest{Port: uint16(port)})
		if err != nil {
			fmt.Println(api.CodeOf(err), err)
			os.Exit(1)
		}
		_ = c.Close()
		fmt.Println("ok")
	default:
		fail(fmt.Errorf("unknown mode %q", os.Args[1]))
	}
}
