package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"path/filepath"
	"strings"

	"github.com/warren-mesh/warren/internal/cgroup2"
)

// mountInfo is one line of /proc/self/mountinfo.
type mountInfo struct {
	root, point, fstype string
	optional            []string // shared:N, master:N, propagate_from:N, unbindable
}

func readMountInfo() ([]mountInfo, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []mountInfo
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, pf := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 6 || len(pf) < 1 {
			continue
		}
		out = append(out, mountInfo{root: f[3], point: f[4], fstype: pf[0], optional: f[6:]})
	}
	return out, nil
}

// covering returns the mount that holds path (the last, deepest mount point
// that is path or one of its parents).
func covering(ms []mountInfo, path string) (mountInfo, bool) {
	var best mountInfo
	found := false
	for _, m := range ms {
		if m.point == path || m.point == "/" || strings.HasPrefix(path, m.point+"/") {
			if !found || len(m.point) >= len(best.point) {
				best, found = m, true
			}
		}
	}
	return best, found
}

// inContainer guesses whether this process runs in a container's mount
// namespace: its root is an overlay (containerd, CRI-O, Docker) or a bind of
// a subdirectory.
func inContainer(ms []mountInfo) bool {
	if root, ok := covering(ms, "/"); ok {
		return root.fstype == "overlay" || root.root != "/"
	}
	return false
}

// checkMountPropagation: in a container, the directories where the host
// makes new mounts the agent must see — pod network namespaces
// (/var/run/netns, bind mounts made by the runtime after the agent started)
// and bpffs — must receive the host's mounts (mountinfo "master:" for a
// HostToContainer volume, or "shared:"). The runtime makes such a volume a
// slave only when its host source is a shared (or slave) mount; on a node
// whose mounts are private (no systemd: systemd makes "/" rshared at boot)
// the runtime refuses the container, or, with propagation None, new pods'
// namespaces never appear inside it.
func checkMountPropagation(pinDir string) func() (string, error) {
	return func() (string, error) {
		ms, err := readMountInfo()
		if err != nil {
			return "", err
		}
		if !inContainer(ms) {
			return "the host's mount namespace (nothing to propagate)", nil
		}
		var ok, bad []string
		for _, p := range []string{netnsRunDir, filepath.Dir(pinDir)} {
			real, err := filepath.EvalSymlinks(p)
			if err != nil {
				bad = append(bad, p+": "+err.Error())
				continue
			}
			m, found := covering(ms, real)
			if !found {
				bad = append(bad, p+": no mount")
				continue
			}
			prop := "private"
			for _, o := range m.optional {
				if strings.HasPrefix(o, "master:") || strings.HasPrefix(o, "shared:") {
					prop = o
				}
			}
			if prop == "private" {
				bad = append(bad, fmt.Sprintf("%s (mount %s) is private", p, m.point))
			} else {
				ok = append(ok, fmt.Sprintf("%s %s", p, prop))
			}
		}
		if len(bad) > 0 {
			return "", fmt.Errorf("%s: new mounts on the host never appear here", strings.Join(bad, "; "))
		}
		return strings.Join(ok, ", "), nil
	}
}

// checkHostCgroupRoot: the host's cgroup2 root is mounted, or the agent can
// mount it at start (cgroup2.HostRoot).
func checkHostCgroupRoot() (string, error) {
	if p, err := cgroup2.FindHostRoot(); err == nil {
		return p, nil
	} else if how, err2 := cgroup2.CanMountHostRoot(); err2 == nil {
		return fmt.Sprintf("not mounted here (%v); the agent mounts it at start %s", err, how), nil
	} else {
		return "", fmt.Errorf("%v, and it cannot be mounted: %w", err, err2)
	}
}

// sharedWithAgent reports whether addr can be bound with SO_REUSEPORT: its
// holder is a SO_REUSEPORT listener of this user, as a running agent's are.
func sharedWithAgent(addr string) bool {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) }); err != nil {
			return err
		}
		return serr
	}}
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return false
	}
	ln.Close()
	return true
}
