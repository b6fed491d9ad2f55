package mounts

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// Set is the mounted host folders of one VM: each one a guest mount and
// the host server process behind it.
type Set struct {
	procs []*Process
	specs []Spec
}

// Attach mounts every spec in the guest through st and starts its server
// as caller, in order. When one fails, the ones already made are stopped
// (their guest mounts go away with their streams) and the error names the
// folder.
func Attach(ctx context.Context, st Streamer, l Launcher, caller Caller, specs []Spec, log io.Writer) (*Set, error) {
	if err := CheckDistinct(specs); err != nil {
		return nil, err
	}
	set := &Set{}
	for _, s := range specs {
		conn, err := Dial(ctx, st, s)
		if err != nil {
			_ = set.Close()
			return nil, err
		}
		// A folder without its read stream still works, through SFTP.
		reads, err := DialReads(ctx, st, s, conn)
		if err != nil {
			fmt.Fprintf(log, "mount %s: no read stream (reads go through SFTP): %v\n", s, err)
			reads = nil
		}
		var rw io.ReadWriteCloser
		if reads != nil {
			rw = reads
		}
		p, err := l.StartReads(ctx, caller, s, conn, rw, log)
		if err != nil {
			_ = conn.Close()
			if reads != nil {
				_ = reads.Close()
			}
			_ = set.Close()
			return nil, err
		}
		set.procs = append(set.procs, p)
		set.specs = append(set.specs, s)
	}
	return set, nil
}

// Specs are the folders of the set, in order.
func (s *Set) Specs() []Spec { return append([]Spec(nil), s.specs...) }

// Close stops every server; the guest unmounts each folder when its stream
// ends.
func (s *Set) Close() error {
	var errs []error
	for _, p := range s.procs {
		if err := p.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	s.procs, s.specs = nil, nil
	return errors.Join(errs...)
}

// CheckAll checks, as caller, every spec's folder (see Launcher.Check),
// so a create can refuse a folder before it records anything.
func CheckAll(ctx context.Context, l Launcher, caller Caller, specs []Spec) error {
	if err := CheckDistinct(specs); err != nil {
		return err
	}
	for _, s := range specs {
		if err := l.Check(ctx, caller, s); err != nil {
			return err
		}
	}
	return nil
}
