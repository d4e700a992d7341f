package cgroup2

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/warren-mesh/warren/internal/testenv"
)

func TestCreateAddRemove(t *testing.T) {
	testenv.RequireRoot(t)
	mnt, err := Mount()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(mnt, fmt.Sprintf("wrcg%d-test", os.Getpid()))
	if err := Create(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Remove(dir) })
	if err := Create(dir); err != nil {
		t.Fatalf("second create: %v", err)
	}
	id, err := ID(dir)
	if err != nil || id == 0 {
		t.Fatalf("id %d, %v", id, err)
	}

	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	if err := AddProc(dir, cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	pids, err := Procs(dir)
	if err != nil || !slices.Contains(pids, cmd.Process.Pid) {
		t.Fatalf("procs %v, %v; want %d", pids, err, cmd.Process.Pid)
	}
	got, err := OfProcess(cmd.Process.Pid)
	if err != nil || got != dir {
		t.Fatalf("cgroup of child %q, %v; want %q", got, err, dir)
	}
	if err := Remove(dir); err == nil {
		t.Fatal("removed a cgroup with a process inside")
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	if err := Remove(dir); err != nil {
		t.Fatalf("second remove: %v", err)
	}
}
