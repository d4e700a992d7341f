package config

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// CheckNetnsPath reports whether path names a network namespace: a file on
// nsfs, as /run/netns/<name> bind mounts and /proc/<pid>/ns/net are. A
// missing path and an ordinary file are errors.
func CheckNetnsPath(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", path, err)
	}
	if st.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("%s is not a namespace file (not on nsfs; create one with `ip netns add` or use /proc/<pid>/ns/net)", path)
	}
	return nil
}

// CheckCgroupPath reports whether path is a directory of the cgroup v2 hierarchy.
func CheckCgroupPath(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not in a cgroup v2 hierarchy", path)
	}
	return nil
}
