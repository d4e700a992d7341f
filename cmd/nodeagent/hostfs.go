package main

import (
	"fmt"
	"log/slog"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/cgroup2"
)

// hostCgroupRoot returns where capture attaches: --cgroup-root when it is a
// cgroup2 directory (tests attach below the root), else the host's cgroup2
// root, found in /proc/self/mountinfo or mounted by the agent itself (at
// --cgroup-root when set, else <state-dir>/cgroupv2, in the agent's own
// mount namespace): see cgroup2.HostRoot. In the chart's container this
// replaces an init container that entered PID 1's namespaces.
func hostCgroupRoot(root, stateDir string, log *slog.Logger) (string, error) {
	if root != "" {
		var st unix.Statfs_t
		if unix.Statfs(root, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			return root, nil
		}
	}
	dir := root
	if dir == "" {
		dir = filepath.Join(stateDir, "cgroupv2")
	}
	p, mounted, err := cgroup2.HostRoot(dir)
	if err != nil {
		return "", fmt.Errorf("the host's cgroup2 root (run nodeagent doctor): %w", err)
	}
	if mounted {
		how, _ := cgroup2.CanMountHostRoot()
		log.Info("mounted the host's cgroup2 hierarchy", "path", p, "how", how)
	}
	return p, nil
}
