package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// QMP is a minimal client for the QEMU Machine Protocol on a Unix socket:
// the greeting, capability negotiation, synchronous commands and the events
// that arrive in between. QEMU serves one QMP client per socket at a time,
// so banger connects per operation and closes again.
type QMP struct {
	conn   net.Conn
	r      *bufio.Reader
	mu     sync.Mutex
	nextID int
	events []Event
}

// Event is an asynchronous QMP event, such as SHUTDOWN or POWERDOWN.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
	// Time is when QEMU emitted the event (its wall clock).
	Time time.Time `json:"-"`
}

// eventTime decodes QMP's {"seconds": s, "microseconds": us} timestamp.
func eventTime(raw json.RawMessage) time.Time {
	var ts struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	}
	if json.Unmarshal(raw, &ts) != nil || ts.Seconds <= 0 {
		return time.Time{}
	}
	return time.Unix(ts.Seconds, ts.Microseconds*1000)
}

// QMPError is an error a command returned.
type QMPError struct {
	Command string
	Class   string
	Desc    string
}

// Error implements error.
func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// DialQMP connects to the QMP socket at path, reads the greeting and
// negotiates capabilities. ctx bounds the whole handshake.
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp dial %s: %w", path, err)
	}
	q := &QMP{conn: conn, r: bufio.NewReaderSize(conn, 64<<10)}
	if err := q.handshake(ctx); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("qmp %s: %w", path, err)
	}
	return q, nil
}

func (q *QMP) handshake(ctx context.Context) error {
	q.setDeadline(ctx)
	var greeting struct {
		QMP *struct {
			Version json.RawMessage `json:"version"`
		} `json:"QMP"`
	}
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	if err := json.Unmarshal(line, &greeting); err != nil || greeting.QMP == nil {
		return fmt.Errorf("unexpected greeting %q", line)
	}
	return q.Execute(ctx, "qmp_capabilities", nil, nil)
}

func (q *QMP) setDeadline(ctx context.Context) {
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(30 * time.Second)
	}
	_ = q.conn.SetDeadline(dl)
}

// Execute runs one command with optional arguments and decodes its return
// value into out (which may be nil). Events read while waiting are kept for
// Events.
func (q *QMP) Execute(ctx context.Context, cmd string, args, out any) error {
	return q.execute(ctx, cmd, args, out, nil)
}

// ExecuteWithFile runs cmd while passing f's descriptor along with it
// (SCM_RIGHTS), as getfd and add-fd expect. QEMU keeps its own copy; the
// caller still owns f.
func (q *QMP) ExecuteWithFile(ctx context.Context, cmd string, args, out any, f *os.File) error {
	return q.execute(ctx, cmd, args, out, f)
}

func (q *QMP) execute(ctx context.Context, cmd string, args, out any, f *os.File) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.setDeadline(ctx)
	q.nextID++
	id := q.nextID
	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("qmp %s: encode: %w", cmd, err)
	}
	if err := q.write(append(b, '\n'), f); err != nil {
		return fmt.Errorf("qmp %s: write: %w", cmd, err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return fmt.Errorf("qmp %s: read: %w", cmd, err)
		}
		var msg struct {
			Event     string          `json:"event"`
			Data      json.RawMessage `json:"data"`
			Timestamp json.RawMessage `json:"timestamp"`
			ID        *int            `json:"id"`
			Return    json.RawMessage `json:"return"`
			Error     *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &msg); err != nil {
			return fmt.Errorf("qmp %s: decode %q: %w", cmd, line, err)
		}
		switch {
		case msg.Event != "":
			q.events = append(q.events, Event{Name: msg.Event, Data: msg.Data, Time: eventTime(msg.Timestamp)})
			continue
		case msg.ID == nil || *msg.ID != id:
			continue // a reply to someone else's request; not ours
		case msg.Error != nil:
			return &QMPError{Command: cmd, Class: msg.Error.Class, Desc: msg.Error.Desc}
		}
		if out != nil {
			if err := json.Unmarshal(msg.Return, out); err != nil {
				return fmt.Errorf("qmp %s: decode return: %w", cmd, err)
			}
		}
		return nil
	}
}

// Events returns and clears the events received so far.
func (q *QMP) Events() []Event {
	q.mu.Lock()
	defer q.mu.Unlock()
	ev := q.events
	q.events = nil
	return ev
}

// WaitEvent reads until the named event arrives, ctx ends or the
// connection closes (QEMU exiting closes it: that is returned as io.EOF).
func (q *QMP) WaitEvent(ctx context.Context, name string) (Event, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, ev := range q.events {
		if ev.Name == name {
			q.events = append(q.events[:i], q.events[i+1:]...)
			return ev, nil
		}
	}
	q.setDeadline(ctx)
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return Event{}, fmt.Errorf("qmp wait for %s: %w", name, err)
		}
		var ev struct {
			Event
			Timestamp json.RawMessage `json:"timestamp"`
		}
		if json.Unmarshal(line, &ev) != nil || ev.Name == "" {
			continue
		}
		ev.Time = eventTime(ev.Timestamp)
		if ev.Name == name {
			return ev.Event, nil
		}
		q.events = append(q.events, ev.Event)
	}
}

func (q *QMP) write(b []byte, f *os.File) error {
	if f == nil {
		_, err := q.conn.Write(b)
		return err
	}
	uc, ok := q.conn.(*net.UnixConn)
	if !ok {
		return errors.New("passing a file needs a Unix socket")
	}
	n, _, err := uc.WriteMsgUnix(b, unix.UnixRights(int(f.Fd())), nil)
	if err == nil && n < len(b) {
		_, err = q.conn.Write(b[n:])
	}
	return err
}

// Status is the result of query-status.
type Status struct {
	Running bool   `json:"running"`
	Status  string `json:"status"` // "running", "paused", "shutdown", ...
}

// QueryStatus runs query-status.
func (q *QMP) QueryStatus(ctx context.Context) (Status, error) {
	var s Status
	err := q.Execute(ctx, "query-status", nil, &s)
	return s, err
}

// Close closes the connection.
func (q *QMP) Close() error {
	if err := q.conn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("qmp close: %w", err)
	}
	return nil
}
