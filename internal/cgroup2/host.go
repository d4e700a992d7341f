package cgroup2

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/netnsx"
)

// initCgroupNSIno is the inode of the initial cgroup namespace
// (PROC_CGROUP_INIT_INO in include/linux/proc_ns.h), fixed since Linux 4.6.
const initCgroupNSIno = 0xEFFFFFFB

// mountEntry is one cgroup2 line of mountinfo: the mount point and the
// cgroup it shows as its root ("/" for the hierarchy's root, as seen from
// the cgroup namespace it was mounted from).
type mountEntry struct{ root, point string }

func cgroup2Mounts() ([]mountEntry, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mountEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields, pf := strings.Fields(pre), strings.Fields(post)
		if ok && len(fields) >= 5 && len(pf) >= 1 && pf[0] == "cgroup2" {
			out = append(out, mountEntry{root: unescape(fields[3]), point: unescape(fields[4])})
		}
	}
	return out, sc.Err()
}

// InInitNamespace reports whether this process is in the host's (initial)
// cgroup namespace.
func InInitNamespace() (bool, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/cgroup", &st); err != nil {
		return false, err
	}
	return st.Ino == initCgroupNSIno, nil
}

// FindHostRoot returns a mount point showing the host's whole cgroup2
// hierarchy, without mounting anything: a cgroup2 mount with root "/" seen
// from the initial cgroup namespace. A container with its own cgroup
// namespace (or whose runtime bind-mounted its own subtree) has none.
func FindHostRoot() (string, error) {
	init, err := InInitNamespace()
	if err != nil {
		return "", err
	}
	if !init {
		return "", errors.New("this process has its own cgroup namespace: its cgroup2 mounts show only its subtree")
	}
	ms, err := cgroup2Mounts()
	if err != nil {
		return "", err
	}
	for _, m := range ms {
		if m.root == "/" {
			return m.point, nil
		}
	}
	if len(ms) > 0 {
		return "", fmt.Errorf("cgroup2 is mounted only as subtrees (%s shows %s)", ms[0].point, ms[0].root)
	}
	return "", ErrNotMounted
}

// initNamespaceHolder returns /proc/<pid>/ns/cgroup of a process in the
// initial cgroup namespace (PID 1 first; with hostPID any host process).
func initNamespaceHolder() (string, error) {
	try := func(pid string) bool {
		var st unix.Stat_t
		return unix.Stat("/proc/"+pid+"/ns/cgroup", &st) == nil && st.Ino == initCgroupNSIno
	}
	if try("1") {
		return "/proc/1/ns/cgroup", nil
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err == nil && try(e.Name()) {
			return "/proc/" + e.Name() + "/ns/cgroup", nil
		}
	}
	return "", errors.New("no process of the host's cgroup namespace is visible (a container needs hostPID, CAP_SYS_PTRACE)")
}

// CanMountHostRoot reports how HostRoot would mount the host's hierarchy
// when FindHostRoot finds none.
func CanMountHostRoot() (string, error) {
	init, err := InInitNamespace()
	if err != nil {
		return "", err
	}
	if init {
		return "from this process's (the host's) cgroup namespace", nil
	}
	holder, err := initNamespaceHolder()
	if err != nil {
		return "", err
	}
	return "from the host's cgroup namespace, joined through " + holder, nil
}

// HostRoot returns a mount point of the host's cgroup2 hierarchy: one that
// is mounted already (FindHostRoot), or a cgroup2 mount it makes at dir in
// this process's mount namespace. A cgroup2 mount shows the hierarchy from
// the cgroup namespace of the thread that mounts it, so from a container
// with its own cgroup namespace the mount is made by a thread that joined
// the host's (through /proc/<pid>/ns/cgroup of a host process: hostPID,
// CAP_SYS_ADMIN, CAP_SYS_PTRACE); that thread is then discarded. This is what
// the chart's agent does instead of an init container entering PID 1's
// namespaces (which a node may not allow: PID 1's /proc/1/ns can be
// unreadable, and an image may lack nsenter --cgroup). mounted reports
// whether it mounted.
func HostRoot(dir string) (path string, mounted bool, err error) {
	if p, err := FindHostRoot(); err == nil {
		return p, false, nil
	}
	// A previous call (or a previous agent in the same mount namespace) may have mounted it.
	if ok, _ := isHostRootMount(dir); ok {
		return dir, false, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", false, fmt.Errorf("cgroup2 mount point %s: %w", dir, err)
	}
	init, err := InInitNamespace()
	if err != nil {
		return "", false, err
	}
	holder := ""
	if !init {
		if holder, err = initNamespaceHolder(); err != nil {
			return "", false, err
		}
	}
	err = netnsx.OnDisposableThread(func() error {
		if holder != "" {
			fd, err := unix.Open(holder, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("open %s: %w", holder, err)
			}
			defer unix.Close(fd)
			if err := unix.Setns(fd, unix.CLONE_NEWCGROUP); err != nil {
				return fmt.Errorf("join the host's cgroup namespace (%s): %w", holder, err)
			}
		}
		if err := unix.Mount("cgroup2", dir, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return fmt.Errorf("mount cgroup2 at %s: %w", dir, err)
		}
		return nil
	})
	if err != nil {
		return "", false, err
	}
	if ok, err := isHostRootMount(dir); !ok {
		return "", true, fmt.Errorf("mounted cgroup2 at %s but it does not show the host's root: %v", dir, err)
	}
	return dir, true, nil
}

func isHostRootMount(dir string) (bool, error) {
	ms, err := cgroup2Mounts()
	if err != nil {
		return false, err
	}
	abs, _ := filepath.Abs(dir)
	for i := len(ms) - 1; i >= 0; i-- { // the last mount at a point is the visible one
		if ms[i].point == abs {
			// mountinfo shows a cgroup2 root relative to the reader's cgroup
			// namespace: the host's root read from a container's is "/.." or deeper.
			if r := ms[i].root; r == "/" || r == "/.." || strings.HasPrefix(r, "/../") {
				return true, nil
			}
			return false, fmt.Errorf("%s shows %s", abs, ms[i].root)
		}
	}
	return false, nil
}
