package cgroup2

import (
	"path/filepath"
	"testing"

	"github.com/warren-mesh/warren/internal/testenv"
)

// TestHostRoot: on the host (the initial cgroup namespace) the existing
// mount of the root is found and nothing is mounted.
func TestHostRoot(t *testing.T) {
	testenv.RequireRoot(t)
	init, err := InInitNamespace()
	if err != nil {
		t.Fatal(err)
	}
	if !init {
		t.Skip("runs in a cgroup namespace of its own")
	}
	want, err := Mount()
	if err != nil {
		testenv.SkipOrFail(t, "no cgroup2 mount: %v", err)
	}
	got, err := FindHostRoot()
	if err != nil || got != want {
		t.Fatalf("FindHostRoot = %q, %v; want %q", got, err, want)
	}
	p, mounted, err := HostRoot(filepath.Join(t.TempDir(), "cg"))
	if err != nil || mounted || p != want {
		t.Fatalf("HostRoot = %q, mounted %v, %v; want %q, not mounted", p, mounted, err, want)
	}
	if how, err := CanMountHostRoot(); err != nil {
		t.Errorf("CanMountHostRoot: %v", err)
	} else {
		t.Logf("would mount %s", how)
	}
}
