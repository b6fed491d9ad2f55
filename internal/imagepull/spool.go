package imagepull

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Scan keeps each layer's decompressed tar, as it reads it, in a spool
// file beside the image being built (<dir>/.layer-<i>.tar), so that
// WriteExt4 reads the bodies from there instead of decompressing every
// layer a second time (decompression is most of a pull's CPU time). The
// spools are the pull's own files in the image's private staging dir;
// WriteExt4 removes them when it ends (a crashed pull's staging dir goes
// with them). They are an optimization only: a layer whose spool would
// take the decompressed total past half the pull's budget (the other half
// is for the image), or whose spool cannot be written, is dropped, and
// WriteExt4 decompresses that layer again.
type spooler struct {
	dir   string
	limit int64    // bytes all spools together may hold
	used  *int64   // bytes spooled so far, over all layers
	path  string   // this layer's spool
	f     *os.File // nil once dropped
	w     *bufio.Writer
	err   error // why this layer's spool was dropped
}

func spoolPath(dir string, layer int) string {
	return filepath.Join(dir, fmt.Sprintf(".layer-%d.tar", layer))
}

// newSpooler starts the spool of layer i (nil when it cannot even be
// created: the layer is simply not spooled).
func newSpooler(dir string, i int, limit int64, used *int64) *spooler {
	s := &spooler{dir: dir, limit: limit, used: used, path: spoolPath(dir, i)}
	f, err := os.OpenFile(s.path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return nil
	}
	s.f, s.w = f, bufio.NewWriterSize(f, 1<<20)
	return s
}

// Write never fails: a spool that cannot go on is dropped.
func (s *spooler) Write(p []byte) (int, error) {
	if s.f == nil {
		return len(p), nil
	}
	if *s.used+int64(len(p)) > s.limit {
		s.drop(fmt.Errorf("the spools would pass %d bytes", s.limit))
		return len(p), nil
	}
	if _, err := s.w.Write(p); err != nil {
		s.drop(err)
		return len(p), nil
	}
	*s.used += int64(len(p))
	return len(p), nil
}

func (s *spooler) drop(err error) {
	s.err = err
	_ = s.f.Close()
	_ = os.Remove(s.path)
	s.f = nil
}

// finish closes the spool after the layer was read whole and returns its
// path, or "" when it was dropped (or the layer was not read whole).
func (s *spooler) finish(whole bool) string {
	if s.f == nil {
		return ""
	}
	if !whole {
		s.drop(fmt.Errorf("the layer was not read whole"))
		return ""
	}
	if err := s.w.Flush(); err != nil {
		s.drop(err)
		return ""
	}
	if err := s.f.Close(); err != nil {
		s.f = nil
		_ = os.Remove(s.path)
		return ""
	}
	s.f = nil
	return s.path
}

// openSpool opens layer i's spool for WriteExt4's second pass.
func openSpool(path string) (io.ReadCloser, error) {
	f, err := os.Open(path) //nolint:gosec // a spool path Scan made: <budgetDir>/.layer-<i>.tar
	if err != nil {
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{bufio.NewReaderSize(f, 1<<20), f}, nil
}
