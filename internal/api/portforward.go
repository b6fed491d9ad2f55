package api

// PortForwardRequest is the body of POST /v1/vms/{name}/port-forward: the
// upgraded connection then carries one TCP connection to the guest's Port
// (its loopback first, then its own addresses), as `banger port-forward`
// opens one per accepted host connection.
type PortForwardRequest struct {
	Port uint16 `json:"port"`
}

// PortForward is one mapping of a running `banger port-forward`, as -o json
// prints it: the host address the CLI listens on (as the calling user) and
// the VM's guest port it reaches.
type PortForward struct {
	VM        string `json:"vm"`
	HostIP    string `json:"host_ip"`
	HostPort  uint16 `json:"host_port"`
	GuestPort uint16 `json:"guest_port"`
	Proto     string `json:"proto"`
}
