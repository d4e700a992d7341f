package lab

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/cgroup2"
)

// acquireLock takes the run's lock file; a live run holds it until it exits,
// so other runs can tell its objects from a crashed run's leftovers.
func acquireLock(prefix string) (*os.File, error) {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return nil, fmt.Errorf("lab: create %s: %w", lockDir, err)
	}
	f, err := os.OpenFile(filepath.Join(lockDir, prefix+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lab: open lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("lab: prefix %s is in use by a running lab: %w", prefix, err)
	}
	fmt.Fprintf(f, "%d\n", os.Getpid())
	return f, nil
}

// alive reports whether a running lab holds prefix's lock.
func alive(prefix string) bool {
	f, err := os.OpenFile(filepath.Join(lockDir, prefix+".lock"), os.O_RDWR, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return true
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}

// Leftovers lists the prefixes of lab runs that have objects on this host
// (namespaces, cgroups, pins or lock files), live or stale.
func Leftovers() ([]string, error) {
	seen := map[string]bool{}
	add := func(dir string, cut func(string) string) error {
		entries, err := os.ReadDir(dir)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", dir, err)
		}
		for _, e := range entries {
			if p := cut(e.Name()); prefixRE.MatchString(p) {
				seen[p] = true
			}
		}
		return nil
	}
	beforeDash := func(s string) string { p, _, _ := strings.Cut(s, "-"); return p }
	if err := add(netnsDir, beforeDash); err != nil {
		return nil, err
	}
	if err := add(lockDir, func(s string) string { return strings.TrimSuffix(s, ".lock") }); err != nil {
		return nil, err
	}
	if err := add(filepath.Join(bpffsRoot, cgroupDir), func(s string) string { return s }); err != nil {
		return nil, err
	}
	if cg, err := cgroup2.Mount(); err == nil {
		if err := add(filepath.Join(cg, cgroupDir), func(s string) string { return s }); err != nil {
			return nil, err
		}
	}
	out := make([]string, 0, len(seen))
	for p := range seen {
		out = append(out, p)
	}
	sort.Strings(out)
	return out, nil
}

// CleanStale removes every object of lab runs whose process no longer holds
// their lock: processes in their cgroups (killed by cgroup membership, never
// by name), network namespaces, cgroups, pins and lock files.
func CleanStale() error {
	prefixes, err := Leftovers()
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range prefixes {
		if alive(p) {
			continue
		}
		if err := removeRun(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeRun deletes everything named with prefix. It is idempotent.
func removeRun(prefix string) error {
	var errs []error
	if cg, err := cgroup2.Mount(); err == nil {
		root := filepath.Join(cg, cgroupDir, prefix)
		if err := killCgroupTree(root); err != nil {
			errs = append(errs, err)
		}
		if err := rmCgroupTree(root); err != nil {
			errs = append(errs, err)
		}
		// The shared parent goes when the last run leaves it.
		os.Remove(filepath.Join(cg, cgroupDir))
	}
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("read %s: %w", netnsDir, err))
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			if err := netns.DeleteNamed(e.Name()); err != nil {
				errs = append(errs, fmt.Errorf("delete netns %s: %w", e.Name(), err))
			}
		}
	}
	pins := filepath.Join(bpffsRoot, cgroupDir, prefix)
	if err := unmountBelow(pins); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(pins); err != nil {
		errs = append(errs, fmt.Errorf("remove pins: %w", err))
	}
	os.Remove(filepath.Join(bpffsRoot, cgroupDir))
	os.Remove(filepath.Join(lockDir, prefix+".lock"))
	if len(errs) > 0 {
		return fmt.Errorf("lab: remove run %s: %w", prefix, errors.Join(errs...))
	}
	return nil
}

// killCgroupTree SIGKILLs every process in the cgroup subtree and waits until
// the subtree is empty.
func killCgroupTree(root string) error {
	if _, err := os.Stat(root); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids, err := cgroupPIDs(root)
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v in %s survive SIGKILL", pids, root)
		}
		// cgroup.kill (5.14+) kills the subtree atomically, also processes forked meanwhile.
		if err := os.WriteFile(filepath.Join(root, "cgroup.kill"), []byte("1"), 0); err != nil {
			for _, pid := range pids {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func cgroupPIDs(root string) ([]int, error) {
	var pids []int
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		data, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		for _, f := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list processes in %s: %w", root, err)
	}
	return pids, nil
}

// rmCgroupTree removes cgroup directories bottom-up (cgroupfs allows only rmdir).
func rmCgroupTree(root string) error {
	var dirs []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("walk %s: %w", root, err)
	}
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("rmdir %s: %w", dirs[i], err))
		}
	}
	return errors.Join(errs...)
}

// unmountBelow detaches every mount at or below dir, deepest first: a run's
// pin directory may hold a bpffs that something mounted on it, and files of a
// mount's root (progs.debug) cannot be removed.
func unmountBelow(dir string) error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			points = append(points, f[4])
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	var errs []error
	for _, p := range points {
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}
