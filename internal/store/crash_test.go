package store

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/model"
)

// TestMain lets the test binary act as the writer subprocess of
// TestKill9Durability.
func TestMain(m *testing.M) {
	if path := os.Getenv("BANGER_STORE_WRITER"); path != "" {
		writer(path)
		return
	}
	os.Exit(m.Run())
}

// writer hammers the store with creates, updates and deletes until killed.
func writer(path string) {
	s, err := Open(path, 10*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	subnet := netip.MustParsePrefix("172.30.0.0/24")
	seed, _ := strconv.Atoi(os.Getenv("BANGER_STORE_SEED"))
	r := rand.New(rand.NewPCG(uint64(seed), 1))
	fmt.Println("ready")
	for i := 0; ; i++ {
		name := fmt.Sprintf("vm-%d-%d", seed, r.IntN(40))
		switch r.IntN(4) {
		case 0, 1:
			_ = s.CreateVM(&model.VM{ID: name + "-" + strconv.Itoa(i), Name: name, State: model.VMCreated}, subnet)
		case 2:
			_, _ = s.UpdateVM(name, func(vm *model.VM) error {
				vm.State = model.VMRunning
				vm.Runtime.Tap.Name = "bgr-" + strconv.Itoa(i)
				return nil
			})
		case 3:
			_ = s.DeleteVM(name)
		}
		if i%7 == 0 {
			_, _ = s.PutImage(model.Image{ID: "img" + strconv.Itoa(i), Name: "img" + strconv.Itoa(r.IntN(5))}, true)
		}
	}
}

// TestKill9Durability kills a writer subprocess with SIGKILL at random
// moments, then checks that the store opens and is consistent, many times.
func TestKill9Durability(t *testing.T) {
	rounds := 30
	if testing.Short() {
		rounds = 5
	}
	path := filepath.Join(t.TempDir(), "banger.db")
	for round := range rounds {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "BANGER_STORE_WRITER="+path, "BANGER_STORE_SEED="+strconv.Itoa(round))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 6)
		if _, err := stdout.Read(buf); err != nil {
			t.Fatalf("round %d: writer did not start: %v", round, err)
		}
		time.Sleep(time.Duration(5+rand.IntN(60)) * time.Millisecond)
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_ = cmd.Wait()

		s, err := Open(path, 5*time.Second)
		if err != nil {
			t.Fatalf("round %d: store does not open after kill -9: %v", round, err)
		}
		if err := s.Check(); err != nil {
			s.Close()
			t.Fatalf("round %d: store inconsistent after kill -9: %v", round, err)
		}
		vms, err := s.ListVMs(nil)
		if err != nil {
			t.Fatalf("round %d: list: %v", round, err)
		}
		s.Close()
		t.Logf("round %d: %d VMs, consistent", round, len(vms))
	}
}
