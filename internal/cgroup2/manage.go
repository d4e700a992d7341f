package cgroup2

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Create makes the cgroup directory dir (under a cgroup2 mount) if it does not exist.
func Create(dir string) error {
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	return nil
}

// Remove deletes the empty cgroup directory dir; a missing directory is not an error.
// Cgroups cannot hold files, so rmdir is the whole removal; it fails with EBUSY
// while a process or a child cgroup is still inside.
func Remove(dir string) error {
	if err := unix.Rmdir(dir); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
	return nil
}

// AddProc moves the process pid (all of its threads) into the cgroup dir.
func AddProc(dir string, pid int) error {
	f := filepath.Join(dir, "cgroup.procs")
	if err := os.WriteFile(f, []byte(strconv.Itoa(pid)), 0); err != nil {
		return fmt.Errorf("move pid %d into %s: %w", pid, dir, err)
	}
	return nil
}

// Procs lists the PIDs in the cgroup dir.
func Procs(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("read procs of %s: %w", dir, err)
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		p, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("parse procs of %s: %w", dir, err)
		}
		pids = append(pids, p)
	}
	return pids, nil
}

// OfProcess returns the absolute cgroup2 directory of process pid (0: the
// caller), from the "0::" line of /proc/<pid>/cgroup.
func OfProcess(pid int) (string, error) {
	mnt, err := Mount()
	if err != nil {
		return "", err
	}
	p := "/proc/self/cgroup"
	if pid != 0 {
		p = fmt.Sprintf("/proc/%d/cgroup", pid)
	}
	f, err := os.Open(p)
	if err != nil {
		return "", fmt.Errorf("read cgroup of pid %d: %w", pid, err)
	}
	defer f.Close()
	rel, err := parseProcCgroup(f)
	if err != nil {
		return "", err
	}
	return filepath.Join(mnt, rel), nil
}

func parseProcCgroup(r io.Reader) (string, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if rel, ok := strings.CutPrefix(sc.Text(), "0::"); ok {
			return rel, nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("scan /proc/pid/cgroup: %w", err)
	}
	return "", errors.New("no cgroup2 entry (0::) in /proc/pid/cgroup")
}

// ID returns the cgroup ID of dir: the inode number of the directory, as
// bpf_get_current_cgroup_id and bpf_link info report it.
func ID(dir string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", dir, err)
	}
	return st.Ino, nil
}
