// Package portfwd forwards TCP and UDP ports between the host and a guest
// through streams of the agent channel, so a guest service is reachable
// even when it binds only the guest's loopback and the guest has no route.
//
// The host side (Listener, Set) binds a host address per Spec and, for each
// TCP connection or each UDP peer, opens one stream to the guest's
// port-forward service (ServiceName) through a Streamer: the agent session
// implements it, tests use socket pairs. The guest side (Guest) answers such
// streams by dialling the guest port itself.
//
// # Stream protocol
//
// A stream starts with one request line from the host and one reply line
// from the guest, each a JSON object ending in '\n' and at most MaxLineSize
// bytes:
//
//	host → guest  {"v":1,"proto":"tcp","port":8080}
//	guest → host  {"ok":true}   or   {"error":"...","code":"refused"}
//
// After "ok" the stream carries the connection's bytes unchanged (TCP), or
// datagrams each prefixed by a big-endian uint16 length (UDP). The guest
// chooses the address it dials (127.0.0.1, then its own addresses): the host
// names only a port, so a stream can never make the guest connect elsewhere.
// A refused TCP dial closes the host connection with a reset, so a client
// sees "connection refused/reset" at once, never a hang.
package portfwd
