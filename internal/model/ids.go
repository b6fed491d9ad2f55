package model

import "regexp"

// idRE is the form of every image and VM id: 24 lowercase hex digits.
var idRE = regexp.MustCompile(`^[0-9a-f]{24}$`)

// LooksLikeID reports whether s has the form of a record id. Names of that
// form are refused: ids are visible to every local user (tap aliases, ps,
// GET /images), so a record named like another's id could otherwise be
// taken for it wherever a name or an id is accepted.
func LooksLikeID(s string) bool { return idRE.MatchString(s) }
