// Package selection is the rule that picks a guest's PID 1: the image's own
// init when it is systemd, else banger's. The initramfs applies it to pick
// its switch_root target, banger's init applies it when the kernel booted
// it directly (init=, no initramfs), and image pull applies it to the
// unpacked image to say which init its VMs will get.
//
// Symbolic links are resolved inside the image, as the guest kernel will
// see them: an absolute target starts again at the image root, ".." stops
// at the image root, and more than MaxLinks links is a loop. Nothing
// outside the image root is ever read.
package selection

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/bangerdev/banger/internal/guestabi"
)

// Paths the rule looks at, inside the image.
const (
	SbinInit       = guestabi.DefaultImageInit // /sbin/init
	SystemdBinary  = "/lib/systemd/systemd"
	systemdName    = "systemd"
	MaxLinks       = 40 // as Linux's MAXSYMLINKS
	maxPathLengths = 4096
)

// ErrLoop means symbolic links did not resolve within MaxLinks steps.
var ErrLoop = errors.New("too many levels of symbolic links")

// Decision is the init a guest will run.
type Decision struct {
	// Init is guestabi.InitImage or guestabi.InitBanger.
	Init guestabi.Init
	// Path is what the kernel or initramfs executes, inside the image.
	Path string
	// Reason says why, for logs and image inspect.
	Reason string
}

// Choose applies the rule to the image at root for the choice asked
// (InitAuto, InitImage or InitBanger; "" is auto). imageInit is init= from
// the kernel command line, or "" for /sbin/init. It fails only when root
// cannot be read at all.
func Choose(root string, choice guestabi.Init, imageInit string) (Decision, error) {
	if _, err := os.Stat(root); err != nil {
		return Decision{}, fmt.Errorf("choose init: image root: %w", err)
	}
	if imageInit == "" {
		imageInit = SbinInit
	}
	haveBanger := Executable(root, guestabi.InitPath)
	image := Decision{Init: guestabi.InitImage, Path: imageInit}
	banger := Decision{Init: guestabi.InitBanger, Path: guestabi.InitPath}
	switch choice {
	case guestabi.InitImage:
		image.Reason = "asked for the image's init"
		return image, nil
	case guestabi.InitBanger:
		if !haveBanger {
			image.Reason = "asked for banger's init, but the image has no " + guestabi.InitPath + " (pulled by an older banger): using the image's"
			return image, nil
		}
		banger.Reason = "asked for banger's init"
		return banger, nil
	}
	if imageInit != SbinInit {
		image.Reason = "init=" + imageInit + " on the kernel command line"
		return image, nil
	}
	systemd, why := IsSystemd(root)
	switch {
	case systemd:
		image.Reason = why
		return image, nil
	case !haveBanger:
		image.Reason = why + ", but the image has no " + guestabi.InitPath + " (pulled by an older banger): using the image's init"
		return image, nil
	}
	banger.Reason = why
	return banger, nil
}

// IsSystemd reports whether the image at root boots systemd: /sbin/init
// resolves, inside the image, to an executable named systemd, or
// /sbin/init is missing and /lib/systemd/systemd exists. The string says
// why, either way.
func IsSystemd(root string) (bool, string) {
	target, err := Resolve(root, SbinInit)
	switch {
	case err == nil:
		if path.Base(target) == systemdName && executableAt(root, target) {
			if target == SbinInit {
				return true, SbinInit + " is systemd"
			}
			return true, SbinInit + " resolves to " + target + " (systemd)"
		}
		if target == SbinInit {
			return false, SbinInit + " is not systemd"
		}
		return false, SbinInit + " resolves to " + target + ", not systemd"
	case errors.Is(err, fs.ErrNotExist):
		if Executable(root, SystemdBinary) {
			return true, SbinInit + " is missing and " + SystemdBinary + " exists"
		}
		return false, "the image has no " + SbinInit + " and no " + SystemdBinary
	default:
		return false, SbinInit + ": " + err.Error()
	}
}

// Executable reports whether p resolves, inside root, to an executable
// regular file.
func Executable(root, p string) bool {
	target, err := Resolve(root, p)
	return err == nil && executableAt(root, target)
}

func executableAt(root, resolved string) bool {
	st, err := os.Lstat(hostPath(root, resolved))
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}

// Resolve follows symbolic links in the absolute image path p as the
// guest would, without leaving root, and returns the image path it ends
// at, which exists. It fails with fs.ErrNotExist when a component is
// missing, ErrLoop after MaxLinks links, and fs.ErrInvalid when a
// non-final component is not a directory.
func Resolve(root, p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("resolve %q: %w: not absolute", p, fs.ErrInvalid)
	}
	links := 0
	done := "/" // resolved so far, always clean and absolute
	rest := p
	for {
		rest = strings.TrimLeft(rest, "/")
		if rest == "" {
			return done, nil
		}
		var name string
		name, rest, _ = strings.Cut(rest, "/")
		switch name {
		case ".":
			continue
		case "..":
			done = path.Dir(done) // the parent of "/" is "/"
			continue
		}
		next := path.Join(done, name)
		st, err := os.Lstat(hostPath(root, next))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return "", fmt.Errorf("resolve %q: %s: %w", p, next, fs.ErrNotExist)
			}
			return "", fmt.Errorf("resolve %q: %w", p, err)
		}
		switch {
		case st.Mode()&fs.ModeSymlink != 0:
			links++
			if links > MaxLinks {
				return "", fmt.Errorf("resolve %q: %w", p, ErrLoop)
			}
			target, err := os.Readlink(hostPath(root, next))
			if err != nil {
				return "", fmt.Errorf("resolve %q: %w", p, err)
			}
			if len(target)+len(rest) > maxPathLengths {
				return "", fmt.Errorf("resolve %q: %w: path too long", p, fs.ErrInvalid)
			}
			if strings.HasPrefix(target, "/") {
				done = "/"
			}
			rest = target + "/" + rest
		case st.IsDir():
			done = next
		default:
			if strings.Trim(rest, "/") != "" {
				return "", fmt.Errorf("resolve %q: %s is not a directory: %w", p, next, fs.ErrInvalid)
			}
			return next, nil
		}
	}
}

// hostPath is the host path of the clean absolute image path p.
func hostPath(root, p string) string {
	return filepath.Join(root, filepath.FromSlash(p))
}
