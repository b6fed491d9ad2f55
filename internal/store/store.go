// Package store is banger's state store: image, kernel and VM records and the
// guest IP leases, in one bbolt file (<state>/banger.db).
//
// bbolt was chosen over SQLite because banger's records are a handful of
// documents looked up by name or id, never joined or queried ad hoc; bbolt
// is pure Go (no cgo, so the daemon builds static), has serializable
// read-write transactions, and its copy-on-write B+tree with fsync on commit
// means a kill -9 at any moment leaves the last committed state. See
// docs/internals.md.
package store

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/blockdev"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/netctl"
	"github.com/bangerdev/banger/internal/vmm"
	bolt "go.etcd.io/bbolt"
)

// Sentinel errors; callers test them with errors.Is.
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("already exists")
	ErrFull     = netctl.ErrSubnetFull
)

var (
	bMeta        = []byte("meta")
	bImages      = []byte("images")       // id -> Image JSON
	bImageNames  = []byte("image_names")  // name -> id
	bKernels     = []byte("kernels")      // name -> Kernel JSON
	bVMs         = []byte("vms")          // id -> VM JSON
	bVMNames     = []byte("vm_names")     // name -> id
	bLeases      = []byte("leases")       // ip -> vm id
	bVMSummaries = []byte("vm_summaries") // id -> VMSummary JSON (schema 2)
	kSchema      = []byte("schema_version")
)

// Store is an open state store. Its methods are safe for concurrent use.
type Store struct {
	db *bolt.DB
}

// Open opens (creating if needed) the store at path and migrates it to the
// current schema. It waits at most timeout for bbolt's file lock.
func Open(path string, timeout time.Duration) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if err != nil {
		return nil, fmt.Errorf("open state store %s: %w", path, err)
	}
	s := &Store{db: db}
	if err := s.migrate(); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("migrate state store %s: %w", path, err)
	}
	return s, nil
}

// Close closes the store.
func (s *Store) Close() error { return s.db.Close() }

// SchemaVersion returns the schema version the store is at.
func (s *Store) SchemaVersion() (int, error) {
	var v int
	err := s.db.View(func(tx *bolt.Tx) error {
		v = schemaVersion(tx)
		return nil
	})
	return v, err
}

func schemaVersion(tx *bolt.Tx) int {
	b := tx.Bucket(bMeta)
	if b == nil {
		return 0
	}
	raw := b.Get(kSchema)
	if len(raw) != 8 {
		return 0
	}
	return int(binary.BigEndian.Uint64(raw))
}

// migrations[i] moves the schema from version i to i+1. Append only.
var migrations = []func(tx *bolt.Tx) error{
	// 0 -> 1: the initial buckets.
	func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bMeta, bImages, bImageNames, bKernels, bVMs, bVMNames, bLeases} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return nil
	},
	// 1 -> 2: precomputed VM summaries for fast listing.
	func(tx *bolt.Tx) error {
		sums, err := tx.CreateBucketIfNotExists(bVMSummaries)
		if err != nil {
			return err
		}
		return tx.Bucket(bVMs).ForEach(func(k, v []byte) error {
			// The runtime is in schema 1's flat shape (migrated at 2 -> 3);
			// a summary does not need it.
			var rec map[string]json.RawMessage
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("decode vm %q: %w", k, err)
			}
			delete(rec, "runtime")
			raw, err := json.Marshal(rec)
			if err != nil {
				return err
			}
			var vm model.VM
			if err := json.Unmarshal(raw, &vm); err != nil {
				return fmt.Errorf("decode vm %q: %w", k, err)
			}
			return put(sums, vm.ID, api.SummaryOf(vm))
		})
	},
	// 2 -> 3: VM.Runtime is composed of its parts (monitor, disk, tap)
	// instead of one flat struct.
	func(tx *bolt.Tx) error {
		vms := tx.Bucket(bVMs)
		return vms.ForEach(func(k, v []byte) error {
			var rec map[string]json.RawMessage
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("decode vm %q: %w", k, err)
			}
			rt, err := DecodeRuntime(rec["runtime"])
			if err != nil {
				return fmt.Errorf("vm %q: %w", k, err)
			}
			if !reflect.ValueOf(rt.Disk).IsZero() && rt.Disk.Driver == "" {
				_ = json.Unmarshal(rec["disk_driver"], &rt.Disk.Driver)
			}
			if rec["runtime"], err = json.Marshal(rt); err != nil {
				return err
			}
			raw, err := json.Marshal(rec)
			if err != nil {
				return err
			}
			return vms.Put(k, raw)
		})
	},
}

// CurrentSchema is the schema version this build writes.
var CurrentSchema = len(migrations)

func (s *Store) migrate() error {
	return s.db.Update(func(tx *bolt.Tx) error {
		v := schemaVersion(tx)
		if v > len(migrations) {
			return fmt.Errorf("store schema version %d is newer than this banger understands (%d): upgrade banger", v, len(migrations))
		}
		for ; v < len(migrations); v++ {
			if err := migrations[v](tx); err != nil {
				return fmt.Errorf("migration %d->%d: %w", v, v+1, err)
			}
			b, err := tx.CreateBucketIfNotExists(bMeta)
			if err != nil {
				return err
			}
			var raw [8]byte
			binary.BigEndian.PutUint64(raw[:], uint64(v+1))
			if err := b.Put(kSchema, raw[:]); err != nil {
				return err
			}
		}
		return nil
	})
}

func put(b *bolt.Bucket, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(key), raw)
}

func get(b *bolt.Bucket, key string, v any) error {
	raw := b.Get([]byte(key))
	if raw == nil {
		return ErrNotFound
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("decode record %q: %w", key, err)
	}
	return nil
}

// ---- images ----

// PutImage stores img. A different image (another id) with the same name is
// ErrConflict unless replace is true, in which case the old record is
// removed and returned.
func (s *Store) PutImage(img model.Image, replace bool) (old *model.Image, err error) {
	err = s.db.Update(func(tx *bolt.Tx) error {
		names, imgs := tx.Bucket(bImageNames), tx.Bucket(bImages)
		// Re-putting an id under a new name drops the old name's index.
		var prev model.Image
		if get(imgs, img.ID, &prev) == nil && prev.Name != img.Name {
			if err := names.Delete([]byte(prev.Name)); err != nil {
				return err
			}
		}
		if imgs.Get([]byte(img.Name)) != nil || names.Get([]byte(img.ID)) != nil {
			return fmt.Errorf("image name %q or id %q is another image's id or name: %w", img.Name, img.ID, ErrConflict)
		}
		if id := names.Get([]byte(img.Name)); id != nil && string(id) != img.ID {
			if !replace {
				return fmt.Errorf("image %q: %w", img.Name, ErrConflict)
			}
			var o model.Image
			if err := get(imgs, string(id), &o); err == nil {
				old = &o
			}
			if err := imgs.Delete(id); err != nil {
				return err
			}
		}
		if err := names.Put([]byte(img.Name), []byte(img.ID)); err != nil {
			return err
		}
		return put(imgs, img.ID, img)
	})
	return old, err
}

// GetImage returns the image with the given name or id.
func (s *Store) GetImage(nameOrID string) (model.Image, error) {
	var img model.Image
	err := s.db.View(func(tx *bolt.Tx) error {
		// An existing id wins over a name (see resolveVM).
		id := []byte(nameOrID)
		if tx.Bucket(bImages).Get(id) == nil {
			if named := tx.Bucket(bImageNames).Get([]byte(nameOrID)); named != nil {
				id = named
			}
		}
		if err := get(tx.Bucket(bImages), string(id), &img); err != nil {
			return fmt.Errorf("image %q: %w", nameOrID, err)
		}
		return nil
	})
	return img, err
}

// ListImages returns every image.
func (s *Store) ListImages() ([]model.Image, error) {
	var out []model.Image
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bImages).ForEach(func(k, v []byte) error {
			var img model.Image
			if err := json.Unmarshal(v, &img); err != nil {
				return fmt.Errorf("decode image %q: %w", k, err)
			}
			out = append(out, img)
			return nil
		})
	})
	return out, err
}

// DeleteImage removes the image record with the given name.
func (s *Store) DeleteImage(name string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		names := tx.Bucket(bImageNames)
		id := names.Get([]byte(name))
		if id == nil {
			return fmt.Errorf("image %q: %w", name, ErrNotFound)
		}
		if err := tx.Bucket(bImages).Delete(id); err != nil {
			return err
		}
		return names.Delete([]byte(name))
	})
}

// ---- kernels ----

// PutKernel stores k; an existing kernel of that name is ErrConflict unless
// replace is true.
func (s *Store) PutKernel(k model.Kernel, replace bool) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bKernels)
		if b.Get([]byte(k.Name)) != nil && !replace {
			return fmt.Errorf("kernel %q: %w", k.Name, ErrConflict)
		}
		return put(b, k.Name, k)
	})
}

// GetKernel returns the kernel with the given name.
func (s *Store) GetKernel(name string) (model.Kernel, error) {
	var k model.Kernel
	err := s.db.View(func(tx *bolt.Tx) error {
		if err := get(tx.Bucket(bKernels), name, &k); err != nil {
			return fmt.Errorf("kernel %q: %w", name, err)
		}
		return nil
	})
	return k, err
}

// ListKernels returns every kernel.
func (s *Store) ListKernels() ([]model.Kernel, error) {
	var out []model.Kernel
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bKernels).ForEach(func(k, v []byte) error {
			var kr model.Kernel
			if err := json.Unmarshal(v, &kr); err != nil {
				return fmt.Errorf("decode kernel %q: %w", k, err)
			}
			out = append(out, kr)
			return nil
		})
	})
	return out, err
}

// DeleteKernel removes the kernel record with the given name.
func (s *Store) DeleteKernel(name string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bKernels)
		if b.Get([]byte(name)) == nil {
			return fmt.Errorf("kernel %q: %w", name, ErrNotFound)
		}
		return b.Delete([]byte(name))
	})
}

// ---- VMs and leases ----

// CreateVM stores a new VM. When subnet is valid it allocates the VM's guest
// IP from it (skipping the network address, the gateway - the first host
// address - and the broadcast address) in the same transaction, so a crash
// can never leave a lease without a VM or a VM without its lease.
func (s *Store) CreateVM(vm *model.VM, subnet netip.Prefix) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		names, vms := tx.Bucket(bVMNames), tx.Bucket(bVMs)
		if names.Get([]byte(vm.Name)) != nil {
			return fmt.Errorf("vm %q: %w", vm.Name, ErrConflict)
		}
		if vms.Get([]byte(vm.ID)) != nil || names.Get([]byte(vm.ID)) != nil {
			return fmt.Errorf("vm id %q: %w", vm.ID, ErrConflict)
		}
		if vms.Get([]byte(vm.Name)) != nil {
			return fmt.Errorf("vm name %q is another VM's id: %w", vm.Name, ErrConflict)
		}
		if subnet.IsValid() {
			ip, err := allocate(tx.Bucket(bLeases), subnet, vm.ID)
			if err != nil {
				return err
			}
			vm.IP = ip.String()
		}
		if err := names.Put([]byte(vm.Name), []byte(vm.ID)); err != nil {
			return err
		}
		return putVM(tx, vm)
	})
}

func allocate(leases *bolt.Bucket, subnet netip.Prefix, vmID string) (netip.Addr, error) {
	used := map[netip.Addr]bool{}
	_ = leases.ForEach(func(k, _ []byte) error {
		if a, err := netip.ParseAddr(string(k)); err == nil {
			used[a] = true
		}
		return nil
	})
	ip, err := netctl.NextFreeIP(subnet, used)
	if err != nil {
		return netip.Addr{}, err
	}
	return ip, leases.Put([]byte(ip.String()), []byte(vmID))
}

// UpdateVM applies fn to the VM with the given id (or name) in one
// transaction and stores the result. fn must not change ID or Name.
func (s *Store) UpdateVM(idOrName string, fn func(*model.VM) error) (model.VM, error) {
	var vm model.VM
	err := s.db.Update(func(tx *bolt.Tx) error {
		id := resolveVM(tx, idOrName)
		b := tx.Bucket(bVMs)
		if err := get(b, id, &vm); err != nil {
			return fmt.Errorf("vm %q: %w", idOrName, err)
		}
		oldID, oldName := vm.ID, vm.Name
		if err := fn(&vm); err != nil {
			return err
		}
		if vm.ID != oldID || vm.Name != oldName {
			return errors.New("UpdateVM: id and name cannot change")
		}
		return putVM(tx, &vm)
	})
	return vm, err
}

// resolveVM turns an id or a name into an id. An existing id wins over a
// name: internal callers pass ids, and a record named like another's id
// (refused since, but possibly left by an older banger) must never be
// taken for it.
func resolveVM(tx *bolt.Tx, idOrName string) string {
	if tx.Bucket(bVMs).Get([]byte(idOrName)) != nil {
		return idOrName
	}
	if id := tx.Bucket(bVMNames).Get([]byte(idOrName)); id != nil {
		return string(id)
	}
	return idOrName
}

// GetVM returns the VM with the given name or id.
func (s *Store) GetVM(idOrName string) (model.VM, error) {
	var vm model.VM
	err := s.db.View(func(tx *bolt.Tx) error {
		if err := get(tx.Bucket(bVMs), resolveVM(tx, idOrName), &vm); err != nil {
			return fmt.Errorf("vm %q: %w", idOrName, err)
		}
		return nil
	})
	return vm, err
}

// ListVMs returns every VM, or only those owned by owner when owner is not nil.
func (s *Store) ListVMs(owner *uint32) ([]model.VM, error) {
	var out []model.VM
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bVMs).ForEach(func(k, v []byte) error {
			var vm model.VM
			if err := json.Unmarshal(v, &vm); err != nil {
				return fmt.Errorf("decode vm %q: %w", k, err)
			}
			if owner == nil || vm.OwnerUID == *owner {
				out = append(out, vm)
			}
			return nil
		})
	})
	return out, err
}

// VMSummaries returns the JSON summaries (api.VMSummary) of every VM,
// or of those owned by owner when it is not nil, in name order. They are
// kept precomputed beside the records, so listing decodes nothing for root.
func (s *Store) VMSummaries(owner *uint32) ([]json.RawMessage, error) {
	var out []json.RawMessage
	err := s.db.View(func(tx *bolt.Tx) error {
		sums := tx.Bucket(bVMSummaries)
		return tx.Bucket(bVMNames).ForEach(func(_, id []byte) error {
			raw := sums.Get(id)
			if raw == nil {
				return nil
			}
			if owner != nil {
				var o struct {
					OwnerUID uint32 `json:"owner_uid"`
				}
				if err := json.Unmarshal(raw, &o); err != nil {
					return fmt.Errorf("decode vm summary %q: %w", id, err)
				}
				if o.OwnerUID != *owner {
					return nil
				}
			}
			out = append(out, append(json.RawMessage(nil), raw...))
			return nil
		})
	})
	return out, err
}

// putVM writes a VM record and its summary.
func putVM(tx *bolt.Tx, vm *model.VM) error {
	if err := put(tx.Bucket(bVMs), vm.ID, vm); err != nil {
		return err
	}
	return put(tx.Bucket(bVMSummaries), vm.ID, api.SummaryOf(*vm))
}

// DeleteVM removes the VM record and releases its IP lease in one
// transaction.
func (s *Store) DeleteVM(idOrName string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		id := resolveVM(tx, idOrName)
		var vm model.VM
		if err := get(tx.Bucket(bVMs), id, &vm); err != nil {
			return fmt.Errorf("vm %q: %w", idOrName, err)
		}
		if vm.IP != "" {
			leases := tx.Bucket(bLeases)
			if string(leases.Get([]byte(vm.IP))) == vm.ID {
				if err := leases.Delete([]byte(vm.IP)); err != nil {
					return err
				}
			}
		}
		if err := tx.Bucket(bVMNames).Delete([]byte(vm.Name)); err != nil {
			return err
		}
		if err := tx.Bucket(bVMSummaries).Delete([]byte(id)); err != nil {
			return err
		}
		return tx.Bucket(bVMs).Delete([]byte(id))
	})
}

// Leases returns the IP -> VM id lease table.
func (s *Store) Leases() (map[string]string, error) {
	out := map[string]string{}
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bLeases).ForEach(func(k, v []byte) error {
			out[string(k)] = string(v)
			return nil
		})
	})
	return out, err
}

// Check verifies the store's internal consistency: every name index entry
// points at a record with that name, every record is indexed, and every
// lease belongs to a VM that holds that IP. It returns every problem found.
func (s *Store) Check() error {
	var errs []error
	err := s.db.View(func(tx *bolt.Tx) error {
		check := func(kind string, names, recs *bolt.Bucket, nameOf func([]byte) (string, error)) {
			_ = names.ForEach(func(n, id []byte) error {
				raw := recs.Get(id)
				if raw == nil {
					errs = append(errs, fmt.Errorf("%s name %q points at missing id %q", kind, n, id))
					return nil
				}
				if got, err := nameOf(raw); err != nil || got != string(n) {
					errs = append(errs, fmt.Errorf("%s name %q points at id %q named %q (%w)", kind, n, id, got, err))
				}
				return nil
			})
			_ = recs.ForEach(func(id, raw []byte) error {
				n, err := nameOf(raw)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s %q: %w", kind, id, err))
					return nil
				}
				if string(names.Get([]byte(n))) != string(id) {
					errs = append(errs, fmt.Errorf("%s %q (%s) is not indexed by name", kind, id, n))
				}
				return nil
			})
		}
		check("image", tx.Bucket(bImageNames), tx.Bucket(bImages), func(raw []byte) (string, error) {
			var v model.Image
			err := json.Unmarshal(raw, &v)
			return v.Name, err
		})
		check("vm", tx.Bucket(bVMNames), tx.Bucket(bVMs), func(raw []byte) (string, error) {
			var v model.VM
			err := json.Unmarshal(raw, &v)
			return v.Name, err
		})
		_ = tx.Bucket(bLeases).ForEach(func(ip, id []byte) error {
			var vm model.VM
			if err := get(tx.Bucket(bVMs), string(id), &vm); err != nil {
				errs = append(errs, fmt.Errorf("lease %s belongs to missing vm %q", ip, id))
			} else if vm.IP != string(ip) {
				errs = append(errs, fmt.Errorf("lease %s belongs to vm %q which holds %q", ip, id, vm.IP))
			}
			return nil
		})
		return nil
	})
	if err != nil {
		return err
	}
	return errors.Join(errs...)
}

// legacyRuntime is VM.Runtime as schema 2 and the handles.json of daemons
// before it stored it: one flat struct. Frozen: it only reads old records.
type legacyRuntime struct {
	Phase          string          `json:"phase"`
	PID            int             `json:"pid"`
	PIDStart       uint64          `json:"pid_start"`
	BootID         string          `json:"boot_id"`
	Cmdline        []string        `json:"cmdline"`
	RuntimeDir     string          `json:"runtime_dir"`
	APISocket      string          `json:"api_socket"`
	AgentSocket    string          `json:"agent_socket"`
	ConsoleLog     string          `json:"console_log"`
	Tap            string          `json:"tap"`
	TapAlias       string          `json:"tap_alias"`
	Loops          []model.LoopDev `json:"loops"`
	DMName         string          `json:"dm_name"`
	DMUUID         string          `json:"dm_uuid"`
	COWPath        string          `json:"cow_path"`
	BaseLink       string          `json:"base_link"`
	DiskPath       string          `json:"disk_path"`
	VsockCID       uint32          `json:"vsock_cid"`
	AgentTransport string          `json:"agent_transport"`
}

// legacyKeys are keys only the flat runtime has.
var legacyKeys = []string{"pid", "pid_start", "boot_id", "cmdline", "api_socket", "agent_socket", "tap_alias",
	"loops", "dm_name", "dm_uuid", "cow_path", "base_link", "disk_path", "vsock_cid", "agent_transport"}

// DecodeRuntime reads a VM runtime in either shape: the composed one this
// build writes, or the flat one of schema 2 (and of handles.json files
// written by earlier daemons), which it converts. Empty input is an empty
// runtime.
func DecodeRuntime(raw []byte) (model.Runtime, error) {
	var rt model.Runtime
	if len(bytes.TrimSpace(raw)) == 0 || bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return rt, nil
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		return rt, fmt.Errorf("decode runtime: %w", err)
	}
	legacy := false
	for _, k := range legacyKeys {
		if _, ok := keys[k]; ok {
			legacy = true
		}
	}
	if t, ok := keys["tap"]; ok && len(t) > 0 && t[0] == '"' {
		legacy = true
	}
	if !legacy {
		if err := json.Unmarshal(raw, &rt); err != nil {
			return rt, fmt.Errorf("decode runtime: %w", err)
		}
		return rt, nil
	}
	var l legacyRuntime
	if err := json.Unmarshal(raw, &l); err != nil {
		return rt, fmt.Errorf("decode runtime (schema 2): %w", err)
	}
	rt = model.Runtime{Phase: l.Phase, RuntimeDir: l.RuntimeDir, ConsoleLog: l.ConsoleLog,
		Monitor: vmm.Handle{PID: l.PID, PIDStart: l.PIDStart, BootID: l.BootID, Cmdline: l.Cmdline,
			APISocket: l.APISocket, AgentSocket: l.AgentSocket, AgentTransport: l.AgentTransport, AgentCID: l.VsockCID},
		Disk: blockdev.Disk{Path: l.DiskPath, COWPath: l.COWPath, BaseLink: l.BaseLink, Loops: l.Loops,
			DMName: l.DMName, DMUUID: l.DMUUID},
		Tap: netctl.TapRef{Name: l.Tap, Alias: l.TapAlias}}
	return rt, nil
}
