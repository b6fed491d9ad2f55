// Command banger-catalog-build builds an image catalog bundle and adds (or
// replaces) its entry in a catalog directory: it runs mmdebstrap (or takes
// a root filesystem tar), turns the tree into an ext4 exactly as `banger
// image pull` does (flatten, mkfs, ownership, guest agents), makes each VM
// generate its own SSH host keys, packs the bundle, and writes
// <out>/<name>/<sha>.bundle and <out>/index.json. Publish the directory
// over http(s) or use it as a file:// catalog. scripts/catalog-build wraps
// it and builds the static guest agent. Run it as root (mmdebstrap).
//
//	banger-catalog-build -name debian-bookworm -suite bookworm -kernel-ref generic-6.1 -agent ./banger-vsock-agent -out ./catalog
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/progress"
)

func main() {
	var o imagecat.BuildOptions
	flag.StringVar(&o.Name, "name", "debian-bookworm", "catalog entry name")
	flag.StringVar(&o.Description, "description", "Debian 12 (bookworm): systemd, openssh-server, sudo, iproute2", "one-line description")
	flag.StringVar(&o.KernelRef, "kernel-ref", "generic-6.1", "kernel catalog entry the image boots with")
	flag.StringVar(&o.AgentBinary, "agent", "", "static banger-vsock-agent to inject (required)")
	flag.StringVar(&o.OutDir, "out", "", "catalog directory (required)")
	flag.StringVar(&o.RootfsTar, "tar", "", "use this root filesystem tar instead of running mmdebstrap")
	flag.StringVar(&o.Kernel, "kernel", "", "put this kernel image in the bundle (its modules must be in the tree)")
	flag.StringVar(&o.Initrd, "initrd", "", "put this initrd in the bundle (with -kernel)")
	suite := flag.String("suite", "bookworm", "Debian suite for mmdebstrap")
	mirror := flag.String("mirror", imagecat.HostMirror(), "Debian archive for mmdebstrap")
	pkgs := flag.String("packages", strings.Join(imagecat.DebianPackages, ","), "packages on top of minbase")
	size := flag.Int64("size-mib", 0, "rootfs.ext4 size in MiB (0: content × 1.5, at least 1 GiB)")
	level := flag.String("level", "better", "zstd level: fastest, default, better or best")
	quiet := flag.Bool("q", false, "no progress output")
	flag.Parse()
	if o.AgentBinary == "" || o.OutDir == "" || flag.NArg() != 0 {
		flag.Usage()
		os.Exit(2)
	}
	lv, ok := map[string]zstd.EncoderLevel{"fastest": zstd.SpeedFastest, "default": zstd.SpeedDefault,
		"better": zstd.SpeedBetterCompression, "best": zstd.SpeedBestCompression}[*level]
	if !ok {
		fmt.Fprintf(os.Stderr, "banger-catalog-build: -level %q: use fastest, default, better or best\n", *level)
		os.Exit(2)
	}
	o.Level, o.Size = lv, *size<<20
	if !*quiet {
		o.Progress = func(ev progress.Event) {
			if ev.Message != "" || ev.Done {
				fmt.Fprintf(os.Stderr, "%s %s %s\n", ev.Phase, ev.Item, ev.Message)
			}
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o, *suite, *mirror, *pkgs); err != nil {
		fmt.Fprintln(os.Stderr, "banger-catalog-build:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o imagecat.BuildOptions, suite, mirror, pkgs string) error {
	start := time.Now()
	if o.RootfsTar == "" {
		tmp, err := os.MkdirTemp("", "banger-mmdebstrap-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		o.RootfsTar = filepath.Join(tmp, "rootfs.tar")
		fmt.Fprintf(os.Stderr, "mmdebstrap %s from %s with %s\n", suite, mirror, pkgs)
		if err := imagecat.Mmdebstrap(ctx, suite, mirror, strings.Split(pkgs, ","), o.RootfsTar, os.Stderr); err != nil {
			return err
		}
		o.Builder = "mmdebstrap --variant=minbase " + suite + " +" + pkgs
	} else if o.Builder == "" {
		o.Builder = "root filesystem tar " + filepath.Base(o.RootfsTar)
	}
	e, err := imagecat.BuildFromTar(ctx, o)
	if err != nil {
		return err
	}
	fmt.Printf("%s %s %s: %s (%d bytes, sha256 %s) in %s\n", e.Name, e.OS.ID, e.OS.Version, e.Bundle.URL, e.Bundle.Size, e.Bundle.SHA256,
		time.Since(start).Round(time.Second))
	return nil
}
