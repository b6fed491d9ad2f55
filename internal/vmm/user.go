package vmm

import (
	"errors"
	"fmt"
	"os/exec"
	"os/user"
	"regexp"
	"strconv"
	"strings"
	"sync"
)

var userNameRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

var ensureMu sync.Mutex

// EnsureUser returns the credential (uid and primary gid) of the system
// user name, which VM monitors run as. When the user does not exist it is
// created as a system user with its own group, no home and no login shell
// (useradd; `make install` does the same). root and any user with uid or
// gid 0 are refused: the point is an unprivileged monitor.
func EnsureUser(name string) (*Credential, error) {
	if !userNameRE.MatchString(name) {
		return nil, fmt.Errorf("VM monitor user %q is not a valid user name", name)
	}
	ensureMu.Lock()
	defer ensureMu.Unlock()
	u, err := user.Lookup(name)
	var unknown user.UnknownUserError
	if errors.As(err, &unknown) {
		out, cerr := exec.Command("useradd", "--system", "--user-group", "--no-create-home",
			"--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name).CombinedOutput()
		if cerr != nil {
			return nil, fmt.Errorf("create the VM monitor user %q: %w: %s (create it with 'make install', or set vmm_user in the config file)",
				name, cerr, strings.TrimSpace(string(out)))
		}
		u, err = user.Lookup(name)
	}
	if err != nil {
		return nil, fmt.Errorf("look up the VM monitor user %q: %w", name, err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("VM monitor user %q: uid %q gid %q are not numbers", name, u.Uid, u.Gid)
	}
	if uid == 0 || gid == 0 {
		return nil, fmt.Errorf("VM monitor user %q has uid %d gid %d: it must be an unprivileged user (not root, not group root)", name, uid, gid)
	}
	return &Credential{UID: uint32(uid), GID: uint32(gid)}, nil
}
