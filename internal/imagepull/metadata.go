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
}

// Metadata maps a cleaned, slash-separated path relative to the root (no
// leading slash; "" is the root itself) to the metadata of the final version
// of that path after all layers are replayed.
type Metadata map[string]FileMeta
