// Package imagepull turns an OCI image into a bootable ext4 root filesystem:
// Pull fetches it, Flatten replays its layers into a staging directory,
// BuildExt4 makes the file system, ApplyOwnership restores the owners, modes,
// device nodes and xattrs that rootless extraction could not, and
// InjectGuestAgents adds banger's guest-side programs and units.
package imagepull

import "io/fs"

// FileType is the kind of a file system entry, as the tar header gave it.
type FileType uint8

// The file types Flatten records.
const (
	TypeRegular FileType = iota
	TypeDir
	TypeSymlink
	TypeHardlink // never stored in Metadata: a hardlink shares its target's inode
	TypeCharDev
	TypeBlockDev
	TypeFIFO
)

// FileMeta is what the image says about one path, from its tar header.
type FileMeta struct {
	Type     FileType          `json:"type"`
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	Mode     fs.FileMode       `json:"mode"` // permission bits plus fs.ModeSetuid, fs.ModeSetgid, fs.ModeSticky
	DevMajor uint32            `json:"dev_major,omitempty"`
	DevMinor uint32            `json:"dev_minor,omitempty"`
	Xattrs   map[string][]byte `json:"xattrs,omitempty"` // e.g. "security.capability"
	Size     int64             `json:"size,omitempty"`   // content bytes of a regular file; 0 for other types
}

// Metadata maps a cleaned, slash-separated path relative to the root (no
// leading slash; "" is the root itself) to the metadata of the final version
// of that path after all layers are replayed.
//
// The contract between Flatten, BuildExt4 and ApplyOwnership (extraction is
// rootless, so the staging directory cannot hold everything):
//
//   - Every path in Metadata of type TypeRegular, TypeDir or TypeSymlink
//     exists in the staging directory with that type, and nothing else does.
//     Regular files have their exact content, symlinks their exact target.
//     Hardlinked paths are real hardlinks in staging; each has its own
//     Metadata entry, with the values of the inode they share.
//   - In staging, everything is owned by the extracting process, and modes
//     are the image's permission bits without setuid, setgid or sticky, and
//     at least u+rw (u+rwx for directories). No xattrs are set in staging.
//     The true uid, gid, mode and xattrs are only in Metadata.
//   - TypeCharDev, TypeBlockDev and TypeFIFO paths are only in Metadata
//     (with DevMajor/DevMinor): nothing is at that path in staging. Their
//     parent directory is. ApplyOwnership creates them in the ext4.
//   - TypeHardlink never appears (see above). Mode never holds type bits.
//   - Every path passed CheckName, and every ancestor of a path is a
//     TypeDir entry.
type Metadata map[string]FileMeta

// ContentBytes is the sum of the sizes of the regular files in m: the
// content an ext4 built from it must hold (hardlinked files count once per
// path, so it may overestimate).
func (m Metadata) ContentBytes() int64 {
	var n int64
	for _, fm := range m {
		if fm.Type == TypeRegular {
			n += fm.Size
		}
	}
	return n
}
