package guestinit

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// account is a resolved OCI User.
type account struct {
	uid, gid uint32
	groups   []uint32
	home     string
	name     string
}

// ErrUser marks a User that cannot be resolved in the image.
var ErrUser = errors.New("unknown user")

// lookupUser resolves an OCI config User ("", "name", "uid", "name:group",
// "uid:gid", "uid:group"...) in root's /etc/passwd and /etc/group, as a
// container runtime does: a numeric uid needs no passwd entry (gid 0 and
// home "/" then), a name does; supplementary groups come from /etc/group
// when the group was not given explicitly.
func lookupUser(root, user string) (account, error) {
	u, g, hasGroup := strings.Cut(user, ":")
	if u == "" {
		u = "0"
	}
	passwd := readDB(filepath.Join(root, "etc/passwd"), 7)
	groupDB := readDB(filepath.Join(root, "etc/group"), 4)
	acct := account{home: "/"}
	if id, err := parseID(u); err == nil {
		acct.uid = id
		acct.name = u
		for _, e := range passwd {
			if e[2] == u {
				acct.name, acct.home = e[0], e[5]
				gid, err := parseID(e[3])
				if err == nil {
					acct.gid = gid
				}
				break
			}
		}
		if id == 0 && acct.name == "0" {
			acct.name, acct.home = "root", "/root"
		}
	} else {
		found := false
		for _, e := range passwd {
			if e[0] == u {
				uid, err1 := parseID(e[2])
				gid, err2 := parseID(e[3])
				if err1 != nil || err2 != nil {
					return acct, fmt.Errorf("%w: %q: malformed /etc/passwd entry", ErrUser, u)
				}
				acct.uid, acct.gid, acct.name, acct.home = uid, gid, u, e[5]
				found = true
				break
			}
		}
		if !found {
			return acct, fmt.Errorf("%w: %q is not in the image's /etc/passwd", ErrUser, u)
		}
	}
	if acct.home == "" {
		acct.home = "/"
	}
	if hasGroup {
		if id, err := parseID(g); err == nil {
			acct.gid = id
		} else {
			found := false
			for _, e := range groupDB {
				if e[0] == g {
					gid, err := parseID(e[2])
					if err != nil {
						return acct, fmt.Errorf("%w: group %q: malformed /etc/group entry", ErrUser, g)
					}
					acct.gid, found = gid, true
					break
				}
			}
			if !found {
				return acct, fmt.Errorf("%w: group %q is not in the image's /etc/group", ErrUser, g)
			}
		}
		return acct, nil
	}
	for _, e := range groupDB {
		for _, m := range strings.Split(e[3], ",") {
			if m != "" && m == acct.name {
				if gid, err := parseID(e[2]); err == nil && gid != acct.gid {
					acct.groups = append(acct.groups, gid)
				}
			}
		}
	}
	return acct, nil
}

func (a account) credential() *syscall.Credential {
	return &syscall.Credential{Uid: a.uid, Gid: a.gid, Groups: a.groups}
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err
}

// readDB reads a colon-separated database, keeping lines with exactly n
// fields. A missing file is empty.
func readDB(path string, n int) [][]string {
	f, err := os.Open(path) //nolint:gosec // fixed paths in the guest root
	if err != nil {
		return nil
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if fields := strings.Split(line, ":"); len(fields) == n {
			out = append(out, fields)
		}
	}
	return out
}

// lookPath finds file as execvp would with the PATH in env, inside root
// (the guest root, "/" in a guest). It returns the path to execute.
func lookPath(root, file string, env []string) (string, error) {
	if strings.Contains(file, "/") {
		return file, nil
	}
	path := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, file)
		if st, err := os.Stat(filepath.Join(root, p)); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%q not found in PATH %s", file, path)
}

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
