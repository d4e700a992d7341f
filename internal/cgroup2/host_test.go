package cgroup2

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

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

// TestHostRootFromCgroupNamespace runs a child in a cgroup namespace of its
// own (rooted at a scratch cgroup, as a container's) and a mount namespace of
// its own: HostRoot there must mount the host's whole hierarchy, joined
// through a host process's cgroup namespace.
func TestHostRootFromCgroupNamespace(t *testing.T) {
	if dir := os.Getenv("WARREN_CGROUP2_HELPER"); dir != "" {
		hostRootHelper(dir)
		return
	}
	testenv.RequireRoot(t)
	root, err := Mount()
	if err != nil {
		testenv.SkipOrFail(t, "no cgroup2 mount: %v", err)
	}
	name := fmt.Sprintf("warren-cgns-test-%d", os.Getpid())
	cg := filepath.Join(root, name)
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(cg)
	fd, err := os.Open(cg)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHostRootFromCgroupNamespace$")
	cmd.Env = append(os.Environ(), "WARREN_CGROUP2_HELPER="+t.TempDir())
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWCGROUP | syscall.CLONE_NEWNS, UseCgroupFD: true, CgroupFD: int(fd.Fd())}
	out, err := cmd.CombinedOutput()
	t.Logf("child:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "sees "+name) {
		t.Errorf("the child's mount does not show the host's hierarchy (its own cgroup %s)", name)
	}
}

func hostRootHelper(dir string) {
	fail := func(f string, a ...any) { fmt.Printf(f+"\n", a...); os.Exit(1) }
	// Keep the host's mounts out of it.
	if err := unix.Mount("", "/", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
		fail("make-rslave: %v", err)
	}
	if init, _ := InInitNamespace(); init {
		fail("still in the initial cgroup namespace")
	}
	if p, err := FindHostRoot(); err == nil {
		fail("FindHostRoot found %s from a private cgroup namespace", p)
	}
	p, mounted, err := HostRoot(filepath.Join(dir, "cg"))
	if err != nil || !mounted {
		fail("HostRoot: %q mounted %v: %v", p, mounted, err)
	}
	how, _ := CanMountHostRoot()
	entries, _ := os.ReadDir(p)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "warren-cgns-test-") {
			fmt.Printf("mounted at %s (%s); sees %s\n", p, how, e.Name())
		}
	}
	unix.Unmount(p, unix.MNT_DETACH)
}
