// Command blast listens on the TCP address in its first argument; on each
// connection it reads a decimal byte count ending in '\n', writes that many
// bytes and closes. The ports benchmark runs it in the guest as the source
// of its throughput figures.
package main

import (
	"bufio"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
)

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

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
			buf := make([]byte, 256<<10)
			_, _ = io.CopyBuffer(c, io.LimitReader(zeros{}, n), buf)
		}()
	}
}
