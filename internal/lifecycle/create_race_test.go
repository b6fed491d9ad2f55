package lifecycle

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/lifecycle/lifecycletest"
	"github.com/bangerdev/banger/internal/model"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/firecracker"
)

// TestCreateStartRace runs 200 rounds of a create and a start of the same
// VM at once (the start goes as soon as the record appears). Create's
// final write used to wipe the runtime the start had recorded, leaving a
// monitor nothing tracked. Now start waits for the create to finish: in
// every round a running monitor is the one the record names.
func TestCreateStartRace(t *testing.T) {
	base := t.TempDir()
	cfg, kernel := lifecycletest.Config(t, base)
	cfg.DiskDriver = "copy"
	cfg.FirecrackerWithoutKVM = true
	st, err := store.Open(cfg.DBPath(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	bg, cancelBG := context.WithCancel(context.Background())
	t.Cleanup(func() { cancelBG(); _ = st.Close() })
	s := New(Options{Config: cfg, Store: st, Logger: slog.New(slog.DiscardHandler), Background: bg})
	var leftovers []vmm.Handle
	t.Cleanup(func() {
		for _, h := range leftovers {
			_, _ = firecracker.New().Stop(context.Background(), h, 0)
		}
	})

	imgDir := filepath.Join(cfg.ImagesDir(), "aaaaaaaaaaaaaaaaaaaaaaaa")
	if err := os.MkdirAll(imgDir, 0o700); err != nil {
		t.Fatal(err)
	}
	rootfs := filepath.Join(imgDir, "rootfs.ext4")
	if err := os.WriteFile(rootfs, make([]byte, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	img := model.Image{ID: "aaaaaaaaaaaaaaaaaaaaaaaa", Name: "img", Source: "oci", Dir: imgDir, RootFS: rootfs, Size: 64 << 10,
		Kernel: "k", Boot: &model.BootArtifacts{Kernel: kernel}, Created: time.Now()}
	if _, err := st.PutImage(img, false); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// start is Start without the disk and network steps (no taps here).
	start := func(id string) bool {
		mu := s.Lock(id)
		mu.Lock()
		defer mu.Unlock()
		run, err := s.beginStart(ctx, id, "")
		if err != nil {
			return false
		}
		sup, err := s.runStart(ctx, run, nil, s.launchMonitor)
		if sup != nil {
			sup.Close()
		}
		return err == nil
	}
	won := 0
	for i := range 200 {
		name := fmt.Sprintf("race-%d", i)
		var wg sync.WaitGroup
		var createErr error
		created := make(chan struct{})
		wg.Add(2)
		go func() {
			defer wg.Done()
			defer close(created)
			_, createErr = s.Create(ctx, api.CreateVMRequest{Image: "img", Name: name, VMM: firecracker.Name}, 0, nil)
		}()
		go func() {
			defer wg.Done()
			for {
				done := false
				select {
				case <-created:
					done = true
				default:
				}
				if v, err := st.GetVM(name); err == nil {
					if start(v.ID) {
						won++
					}
					return
				}
				if done {
					return
				}
				time.Sleep(50 * time.Microsecond)
			}
		}()
		wg.Wait()
		if createErr != nil {
			t.Fatalf("round %d: create: %v", i, createErr)
		}
		got, err := st.GetVM(name)
		if err != nil {
			t.Fatalf("round %d: the VM record is gone: %v", i, err)
		}
		procs := vmm.FindMonitors(s.MonitorPrograms(), s.RuntimeDirs())[got.ID]
		leftovers = append(leftovers, procs...)
		rec := got.Runtime.Monitor.PID
		if len(procs) > 0 && rec != procs[0].PID {
			t.Fatalf("round %d: monitor pid %d runs, but the record (state %s) holds pid %d: an untracked monitor", i, procs[0].PID, got.State, rec)
		}
		if rec != 0 && len(procs) == 0 {
			t.Fatalf("round %d: the record holds pid %d, but no monitor runs", i, rec)
		}
		for _, h := range procs {
			_, _ = firecracker.New().Stop(ctx, h, 0)
		}
	}
	t.Logf("200 rounds; the start ran a monitor in %d", won)
}
