package kube_test

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/cgroup2"
	"github.com/warren-mesh/warren/internal/testenv"
	"github.com/warren-mesh/warren/pkg/config/kube"
)

// TestProcResolver runs processes in their own network namespaces inside
// pod-like cgroups, named as the systemd and cgroupfs drivers name them, and
// finds their namespaces from /proc by pod UID.
func TestProcResolver(t *testing.T) {
	testenv.RequireRoot(t)
	root, err := cgroup2.Mount()
	if err != nil {
		testenv.SkipOrFail(t, "cgroup2: %v", err)
	}
	b := make([]byte, 4)
	rand.Read(b)
	top := filepath.Join(root, "warren-kubetest-"+hex.EncodeToString(b))
	systemdUID := "0a1b2c3d-1111-2222-3333-" + hex.EncodeToString(b) + "0000"
	cgroupfsUID := "0a1b2c3d-4444-5555-6666-" + hex.EncodeToString(b) + "0000"
	systemdPod := filepath.Join(top, "kubepods.slice", "kubepods-besteffort.slice",
		"kubepods-besteffort-pod"+strings.ReplaceAll(systemdUID, "-", "_")+".slice")
	cgroupfsPod := filepath.Join(top, "kubepods", "burstable", "pod"+cgroupfsUID)
	dirs := []string{top,
		filepath.Join(top, "kubepods.slice"), filepath.Join(top, "kubepods.slice", "kubepods-besteffort.slice"), systemdPod,
		filepath.Join(systemdPod, "cri-containerd-pause.scope"),
		filepath.Join(top, "kubepods"), filepath.Join(top, "kubepods", "burstable"), cgroupfsPod,
		filepath.Join(cgroupfsPod, "pause"), filepath.Join(cgroupfsPod, "app"),
	}
	for _, d := range dirs {
		if err := cgroup2.Create(d); err != nil {
			t.Fatal(err)
		}
	}
	var procs []*exec.Cmd
	t.Cleanup(func() {
		for _, c := range procs {
			c.Process.Kill()
			c.Wait()
		}
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := cgroup2.Remove(dirs[i]); err != nil {
				t.Errorf("remove cgroup: %v", err)
			}
		}
	})
	// start runs sleep in a new network namespace, directly inside cgroup dir.
	start := func(dir string) *exec.Cmd {
		t.Helper()
		fd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		c := exec.Command("sleep", "60")
		c.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, UseCgroupFD: true, CgroupFD: fd}
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		procs = append(procs, c)
		return c
	}
	pauseA := start(filepath.Join(systemdPod, "cri-containerd-pause.scope"))
	pauseB := start(filepath.Join(cgroupfsPod, "pause"))
	time.Sleep(20 * time.Millisecond) // a later start time for the app container
	start(filepath.Join(cgroupfsPod, "app"))

	// A bind mount of pod A's namespace, as containerd keeps in /var/run/netns.
	netnsDir := t.TempDir()
	stable := filepath.Join(netnsDir, "cni-test")
	if err := os.WriteFile(stable, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("/proc/"+strconv.Itoa(pauseA.Process.Pid)+"/ns/net", stable, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(stable, unix.MNT_DETACH) })

	got, err := kube.ProcResolver{NetnsDirs: []string{"/nonexistent", netnsDir}}.Resolve([]string{systemdUID, cgroupfsUID, "no-such-pod"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("resolved %v, want two pods", got)
	}
	rel := func(dir string) string { return strings.TrimPrefix(dir, root) }
	cases := []struct {
		name, uid, path, cgroup string
		pid                     int
	}{
		{"systemd driver, bind mount", systemdUID, stable, rel(systemdPod), pauseA.Process.Pid},
		{"cgroupfs driver, oldest process", cgroupfsUID, "/proc/" + strconv.Itoa(pauseB.Process.Pid) + "/ns/net", rel(cgroupfsPod), pauseB.Process.Pid},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := got[c.uid]
			if n.Path != c.path || n.CgroupPath != c.cgroup {
				t.Errorf("got %+v, want path %s cgroup %s", n, c.path, c.cgroup)
			}
			if !sameFile(t, n.Path, "/proc/"+strconv.Itoa(c.pid)+"/ns/net") {
				t.Errorf("%s is not the namespace of pid %d", n.Path, c.pid)
			}
			if sameFile(t, n.Path, "/proc/self/ns/net") {
				t.Errorf("%s is the host's namespace", n.Path)
			}
		})
	}
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(b, &sb); err != nil {
		t.Fatal(err)
	}
	return sa.Ino == sb.Ino && sa.Dev == sb.Dev
}
