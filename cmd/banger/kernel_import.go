package main

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/progress"
	"github.com/spf13/cobra"
)

func newKernelImportCmd(g *globals) *cobra.Command {
	var kernel, initrd, modules, deb string
	var force bool
	cmd := &cobra.Command{
		Use:   "import NAME (--kernel FILE [--initrd FILE] [--modules DIR] | --deb FILE.deb)",
		Short: "Import a kernel from files or from a Debian/Ubuntu linux-image package",
		Long: "Import a kernel. With --kernel, the kernel image (bzImage or ELF vmlinux) and optionally an initrd and a\n" +
			"lib/modules/<version> tree. With --deb, a linux-image-*.deb: banger takes its kernel and modules, runs depmod\n" +
			"and generates an initramfs that loads the virtio drivers. The CLI uploads the files to the daemon.",
		Example: "  banger kernel import generic-6.1 --deb linux-image-6.1.0-28-cloud-amd64_6.1.119-1_amd64.deb\n" +
			"  banger kernel import custom --kernel ./vmlinux --modules ./lib/modules/6.12.1",
		Args: exactArgs(1, "a kernel name"),
		RunE: func(c *cobra.Command, args []string) error {
			name := args[0]
			if err := model.ValidateName("kernel", name); err != nil {
				return api.Errorf(api.CodeInvalid, "%v", err)
			}
			var files []upload
			switch {
			case deb != "" && (kernel != "" || initrd != "" || modules != ""):
				return api.Errorf(api.CodeInvalid, "--deb cannot be combined with --kernel, --initrd or --modules")
			case deb != "":
				files = append(files, upload{"package.deb", deb})
			case kernel != "":
				files = append(files, upload{"kernel", kernel})
				if initrd != "" {
					files = append(files, upload{"initrd", initrd})
				}
				if modules != "" {
					files = append(files, upload{"modules/" + filepath.Base(filepath.Clean(modules)), modules})
				}
			default:
				return api.Errorf(api.CodeInvalid, "pass --kernel FILE or --deb FILE")
			}
			for _, f := range files {
				if _, err := os.Stat(f.path); err != nil {
					return api.Errorf(api.CodeInvalid, "%v", err)
				}
			}
			pr := newProgressRenderer(g.errOut)
			defer pr.Close()
			body, errc := tarUpload(c.Context(), files, pr.Func())
			q := url.Values{"name": {name}}
			if force {
				q.Set("force", "true")
			}
			var k model.Kernel
			err := g.client().StreamBody(c.Context(), "POST", "/kernels/import?"+q.Encode(), body, pr.Func(), &k)
			if uerr := <-errc; uerr != nil && err == nil {
				err = uerr
			}
			pr.Close()
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(g.out, k)
			}
			fmt.Fprintf(g.out, "imported kernel %s (%s, %s)\n", k.Name, k.Version, k.Format)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&kernel, "kernel", "", "kernel image (bzImage or vmlinux)")
	f.StringVar(&initrd, "initrd", "", "initrd to boot it with")
	f.StringVar(&modules, "modules", "", "its lib/modules/<version> directory")
	f.StringVar(&deb, "deb", "", "a Debian/Ubuntu linux-image-*.deb package")
	f.BoolVar(&force, "force", false, "replace a kernel of the same name")
	return cmd
}

type upload struct{ name, path string }

// tarUpload streams files (a directory is sent recursively, symlinks
// skipped) as a tar, reporting bytes sent.
func tarUpload(ctx context.Context, files []upload, report progress.Func) (io.Reader, <-chan error) {
	pr, pw := io.Pipe()
	errc := make(chan error, 1)
	var total int64
	for _, f := range files {
		_ = filepath.WalkDir(f.path, func(_ string, de fs.DirEntry, err error) error {
			if err == nil && de.Type().IsRegular() {
				if fi, err := de.Info(); err == nil {
					total += fi.Size()
				}
			}
			return nil
		})
	}
	go func() {
		tw := tar.NewWriter(pw)
		var sent int64
		err := func() error {
			for _, f := range files {
				err := filepath.WalkDir(f.path, func(p string, de fs.DirEntry, err error) error {
					if err != nil {
						return err
					}
					if ctx.Err() != nil {
						return ctx.Err()
					}
					rel, _ := filepath.Rel(f.path, p)
					name := f.name
					if rel != "." {
						name += "/" + filepath.ToSlash(rel)
					}
					switch {
					case de.IsDir():
						return tw.WriteHeader(&tar.Header{Name: name + "/", Typeflag: tar.TypeDir, Mode: 0o755})
					case de.Type().IsRegular():
						fi, err := de.Info()
						if err != nil {
							return err
						}
						if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: fi.Size()}); err != nil {
							return err
						}
						in, err := os.Open(p) //nolint:gosec // the CLI reads its own user's files with that user's rights
						if err != nil {
							return err
						}
						defer in.Close()
						n, err := io.Copy(tw, in)
						sent += n
						report.Report(progress.Event{Phase: "upload", Current: sent, Total: total})
						return err
					default:
						return nil // symlinks (build/, source/) are not needed
					}
				})
				if err != nil {
					return fmt.Errorf("upload %s: %w", f.path, err)
				}
			}
			return tw.Close()
		}()
		report.Report(progress.Event{Phase: "upload", Current: sent, Total: total, Done: err == nil})
		_ = pw.CloseWithError(err)
		if err != nil && !strings.Contains(err.Error(), "closed pipe") {
			errc <- err
		}
		close(errc)
	}()
	return pr, errc
}
