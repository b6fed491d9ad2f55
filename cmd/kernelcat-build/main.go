// Command kernelcat-build adds a kernel from a Debian/Ubuntu linux-image
// package to a banger kernel catalog directory: it writes
// <out>/<name>/{kernel,initrd,modules.tar.gz} and adds the entry to
// <out>/index.json. Publish the directory over http(s) or use it as a
// file:// catalog. scripts/kernelcat-build wraps it and builds banger-init.
//
//	kernelcat-build -deb linux-image-6.1.0-56-cloud-amd64_*.deb -name generic-6.1 -init ./banger-init -out ./catalog
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/bangerdev/banger/internal/kernels/kernelcat"
	"github.com/bangerdev/banger/internal/progress"
)

func main() {
	var o kernelcat.BuildOptions
	flag.StringVar(&o.Deb, "deb", "", "linux-image .deb to add (required)")
	flag.StringVar(&o.Name, "name", "", "catalog entry name, e.g. generic-6.1 (required)")
	flag.StringVar(&o.OutDir, "out", "", "catalog directory (required)")
	flag.StringVar(&o.InitBinary, "init", "", "static banger-init binary for the initramfs (required)")
	flag.StringVar(&o.ModulesCompression, "modules-compression", "gzip", "modules tarball compression: gzip or zstd")
	quiet := flag.Bool("q", false, "no progress output")
	flag.Parse()
	if o.Deb == "" || o.Name == "" || o.OutDir == "" || o.InitBinary == "" || flag.NArg() != 0 {
		flag.Usage()
		os.Exit(2)
	}
	if !*quiet {
		o.Progress = func(ev progress.Event) {
			if ev.Done {
				fmt.Fprintf(os.Stderr, "%s %s: done %s\n", ev.Phase, ev.Item, ev.Message)
			} else if ev.Message != "" || ev.Total == 0 {
				fmt.Fprintf(os.Stderr, "%s %s %s\n", ev.Phase, ev.Item, ev.Message)
			}
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	e, err := kernelcat.BuildFromDeb(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kernelcat-build:", err)
		os.Exit(1)
	}
	fmt.Printf("%s %s kernel=%s initrd=%v modules=%v\n", e.Name, e.Version, e.Kernel.SHA256, e.Initrd != nil, e.Modules != nil)
}
