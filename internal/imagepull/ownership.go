package imagepull

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
)

// ErrBadMetadata is returned by ApplyOwnership for a Metadata entry it
// cannot apply: an unknown type, a hardlink, a negative id, or an xattr name
// CheckXattrName refuses.
var ErrBadMetadata = errors.New("invalid image metadata")

// xattrNameRE is the xattr names banger accepts from an image, and the one
// check both Flatten and ApplyOwnership apply. They go to debugfs unquoted,
// so the character set is the script's safe bare words, and the namespace
// prefix guarantees they never begin with '-' (which ea_set's getopt would
// read as an option). Of system.*, only the two POSIX ACLs are accepted
// (systemd images carry them, e.g. on /var/log/journal); the rest
// (ext4's own system.data, richacl ...) are refused.
var xattrNameRE = regexp.MustCompile(`^((security|user|trusted)\.[A-Za-z0-9_.:+-]+|system\.posix_acl_(access|default))$`)

// ErrBadXattrName is wrapped by CheckXattrName.
var ErrBadXattrName = errors.New("xattr name not accepted")

// CheckXattrName reports whether name is an xattr name banger writes: in the
// security, user or trusted namespace, made of letters, digits and
// "_.:+-", at most 255 bytes (the kernel's XATTR_NAME_MAX), or one of
// system.posix_acl_access and system.posix_acl_default.
func CheckXattrName(name string) error {
	if len(name) > 255 || !xattrNameRE.MatchString(name) {
		return fmt.Errorf("xattr name %q: %w", name, ErrBadXattrName)
	}
	return nil
}

// ApplyOwnership restores in the ext4 image at ext4Path what rootless
// extraction could not: for every path in md it sets the uid and gid (32
// bits), the full mode (file type, permissions, setuid, setgid, sticky),
// creates the character devices, block devices and FIFOs that are missing
// or were staged as something else, and sets xattrs (security.capability
// and the like). Everything is done by one batched `debugfs -w` script, so
// the image is never mounted.
//
// Every path is checked with CheckName here as well as in Flatten: a caller
// that never ran Flatten still cannot inject debugfs commands. Any error
// debugfs reports fails the call; the image is then partially updated and
// the caller should discard it.
func ApplyOwnership(ctx context.Context, ext4Path string, md Metadata) error {
	abs, err := filepath.Abs(ext4Path)
	if err != nil {
		return fmt.Errorf("apply ownership to %q: %w", ext4Path, err)
	}
	keys := make([]string, 0, len(md))
	var special []string // absolute paths of device and FIFO entries
	for k, m := range md {
		if err := checkMeta(k, m); err != nil {
			return fmt.Errorf("apply ownership to %q: %w", abs, err)
		}
		keys = append(keys, k)
		if isSpecial(m.Type) {
			special = append(special, imagePath(k))
		}
	}
	// Sorted, a directory comes before everything below it.
	sort.Strings(keys)

	// Devices and FIFOs may be absent from the image (rootless extraction
	// cannot make devices) or staged as a placeholder: find out which.
	kinds, err := probe(ctx, abs, special)
	if err != nil {
		return fmt.Errorf("apply ownership to %q: %w", abs, err)
	}

	xattrDir := ""
	defer func() {
		if xattrDir != "" {
			_ = os.RemoveAll(xattrDir)
		}
	}()

	var s script
	for _, k := range keys {
		m := md[k]
		p := imagePath(k)
		if isSpecial(m.Type) {
			switch kind := kinds[p]; {
			case kind == specialKind(m.Type):
				// Already the right kind: only owner and mode below.
			case kind == kindMissing:
				addMknod(&s, p, m)
			case kind == kindDir:
				return fmt.Errorf("apply ownership to %q: %q is a directory in the image, metadata says %s: %w", abs, p, specialKind(m.Type), ErrBadMetadata)
			default:
				s.add("rm", qpath(p))
				addMknod(&s, p, m)
			}
		}
		s.add("set_inode_field", qpath(p), lit("uid"), lit(strconv.Itoa(m.UID)))
		s.add("set_inode_field", qpath(p), lit("gid"), lit(strconv.Itoa(m.GID)))
		s.add("set_inode_field", qpath(p), lit("mode"), lit(octalMode(m)))

		names := make([]string, 0, len(m.Xattrs))
		for name := range m.Xattrs {
			names = append(names, name)
		}
		sort.Strings(names)
		for i, name := range names {
			if xattrDir == "" {
				if xattrDir, err = os.MkdirTemp("", "banger-xattr-"); err != nil {
					return fmt.Errorf("apply ownership to %q: %w", abs, err)
				}
			}
			// Values are binary (security.capability is a struct), so
			// they go through a file: ea_set -f FILE PATH NAME.
			f := filepath.Join(xattrDir, strconv.Itoa(s.len())+"-"+strconv.Itoa(i))
			if err := os.WriteFile(f, m.Xattrs[name], 0o600); err != nil {
				return fmt.Errorf("apply ownership to %q: write xattr value: %w", abs, err)
			}
			s.add("ea_set", lit("-f"), qpath(f), qpath(p), lit(name))
		}
	}
	if s.err != nil {
		return fmt.Errorf("apply ownership to %q: %w", abs, s.err)
	}
	if s.len() == 0 {
		return nil
	}
	if _, err := runDebugfs(ctx, abs, &s, true); err != nil {
		return fmt.Errorf("apply ownership: %w", err)
	}
	return nil
}

// addMknod creates the device or FIFO p. debugfs's mknod takes a name in
// the current directory (a slash in it would become part of the name), so
// it changes to the parent first and back to the root after.
func addMknod(s *script, p string, m FileMeta) {
	dir, base := path.Split(p)
	s.add("cd", qpath(dir))
	switch m.Type {
	case TypeFIFO:
		s.add("mknod", qbase(base), lit("p"))
	case TypeCharDev:
		s.add("mknod", qbase(base), lit("c"), lit(strconv.FormatUint(uint64(m.DevMajor), 10)), lit(strconv.FormatUint(uint64(m.DevMinor), 10)))
	case TypeBlockDev:
		s.add("mknod", qbase(base), lit("b"), lit(strconv.FormatUint(uint64(m.DevMajor), 10)), lit(strconv.FormatUint(uint64(m.DevMinor), 10)))
	}
	s.add("cd", qpath("/"))
}

// qbase is a single name inside the current directory: mknod and write take
// one. It is quoted like a path; mknod and write do not use getopt, so a
// leading '-' is taken literally, and a bare <N> is not resolved for a name
// that is about to be created.
func qbase(name string) word { return word{text: name, quoted: true, base: true} }

func isSpecial(t FileType) bool {
	return t == TypeCharDev || t == TypeBlockDev || t == TypeFIFO
}

func specialKind(t FileType) statKind {
	switch t {
	case TypeCharDev:
		return kindChar
	case TypeBlockDev:
		return kindBlock
	case TypeFIFO:
		return kindFIFO
	}
	return kindMissing
}

// checkMeta validates one Metadata entry before anything is written.
func checkMeta(rel string, m FileMeta) error {
	if err := CheckName(rel); err != nil {
		return err
	}
	if rel != path.Clean("/" + rel)[1:] && rel != "" {
		return fmt.Errorf("entry %q: not a clean relative path: %w", rel, ErrBadMetadata)
	}
	if typeBits(m.Type) == 0 {
		return fmt.Errorf("entry %q: file type %d cannot be applied: %w", rel, m.Type, ErrBadMetadata)
	}
	if isSpecial(m.Type) && rel == "" {
		return fmt.Errorf("entry %q: the root cannot be a device: %w", rel, ErrBadMetadata)
	}
	if m.UID < 0 || m.GID < 0 || int64(m.UID) > 0xFFFFFFFF || int64(m.GID) > 0xFFFFFFFF {
		return fmt.Errorf("entry %q: uid %d gid %d out of range: %w", rel, m.UID, m.GID, ErrBadMetadata)
	}
	for name := range m.Xattrs {
		if err := CheckXattrName(name); err != nil {
			return fmt.Errorf("entry %q: %w: %w", rel, err, ErrBadMetadata)
		}
	}
	return nil
}

// typeBits is the S_IFMT part of an inode mode for a file type.
func typeBits(t FileType) uint32 {
	switch t {
	case TypeRegular:
		return 0o100000
	case TypeDir:
		return 0o040000
	case TypeSymlink:
		return 0o120000
	case TypeCharDev:
		return 0o020000
	case TypeBlockDev:
		return 0o060000
	case TypeFIFO:
		return 0o010000
	}
	return 0
}

// unixMode is the full inode mode of m: type bits, setuid/setgid/sticky,
// permissions.
func unixMode(m FileMeta) uint32 {
	mode := typeBits(m.Type) | uint32(m.Mode.Perm())
	if m.Mode&fs.ModeSetuid != 0 {
		mode |= 0o4000
	}
	if m.Mode&fs.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if m.Mode&fs.ModeSticky != 0 {
		mode |= 0o1000
	}
	return mode
}

// octalMode writes the mode for set_inode_field, which parses it with
// strtoull(s, 0): it must carry a leading 0 to be read as octal, and it must
// carry the type bits, which it overwrites.
func octalMode(m FileMeta) string {
	return "0" + strconv.FormatUint(uint64(unixMode(m)), 8)
}
