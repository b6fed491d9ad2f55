// Command udpecho answers every UDP datagram on the address in its first
// argument with "echo:" and the datagram; the ports test runs it in the
// guest.
package main

import (
	"net"
	"os"
)

func main() {
	c, err := net.ListenPacket("udp", os.Args[1])
	if err != nil {
		os.Exit(1)
	}
	buf := make([]byte, 65535)
	for {
		n, peer, err := c.ReadFrom(buf)
		if err != nil {
			os.Exit(1)
		}
		_, _ = c.WriteTo(append([]byte("echo:"), buf[:n]...), peer)
	}
}
