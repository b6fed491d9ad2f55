// Command blast listens on the TCP address in its first argument; on each
// connection it reads a decimal byte count ending in '\n', writes that many
// bytes and closes. The ports benchmark runs it in the guest as the source
// of its throughput figures.
package main

import (
	"bufio"
	"net"
	"os"
	"strconv"
	"strings"
)

func main() {
	l, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		os.Exit(1)
	}
	for {
		c, err := l.Accept()
		if err != nil {
			os.Exit(1)
		}
		go func() {
			defer c.Close()
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				return
			}
			n, err := strconv.ParseInt(strings.TrimSpace(line), 10, 64)
			if err != nil || n < 0 {
				return
			}
			// The same zeroed buffer over and over: the source costs the
			// guest no more than a write per buffer.
			buf := make([]byte, 256<<10)
			for n > 0 {
				k, err := c.Write(buf[:min(n, int64(len(buf)))])
				if err != nil {
					return
				}
				n -= int64(k)
			}
		}()
	}
}
