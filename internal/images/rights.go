package images

import "github.com/bangerdev/banger/internal/api"

// mayReplace is the rule for shared records (images, kernels): any group
// member may pull them, but replacing one deletes it, so only its owner or
// root may. Records from before owners were kept are root's.
func mayReplace(uid uint32, kind, name string, owner uint32) error {
	if uid == 0 || uid == owner {
		return nil
	}
	return api.Errorf(api.CodeForbidden,
		"%s %q belongs to uid %d: only its owner or root may replace it; pull under another --name", kind, name, owner)
}
