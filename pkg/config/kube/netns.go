package kube

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// ProcResolver finds local pods' network namespaces from the host's /proc
// (the agent runs with hostPID), by the pod UID in each process's cgroup
// path. See the package documentation for the choice and its race.
type ProcResolver struct {
	// ProcRoot is the host's /proc; "" means /proc.
	ProcRoot string
	// NetnsDirs are searched for a bind mount of the same namespace, a path
	// stable for the pod's whole life (containerd and CRI-O keep them in
	// /var/run/netns); nil means none.
	NetnsDirs []string
}

// Resolve scans /proc once and returns the network namespace of every pod
// UID in uids that has a process. Pods without a process are absent.
func (r ProcResolver) Resolve(uids []string) (map[string]Netns, error) {
	root := r.ProcRoot
	if root == "" {
		root = "/proc"
	}
	want := map[string]string{} // cgroup path fragment → uid
	for _, uid := range uids {
		want["pod"+uid] = uid                               // cgroupfs: .../pod<uid>/...
		want["pod"+strings.ReplaceAll(uid, "-", "_")] = uid // systemd: ...-pod<uid_>.slice
	}
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", root, err)
	}
	type found struct {
		pid    int
		start  uint64
		cgroup string
	}
	best := map[string]found{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cg, err := os.ReadFile(filepath.Join(root, e.Name(), "cgroup"))
		if err != nil {
			continue // exited, or a kernel thread we may not read
		}
		uid, podDir := matchCgroup(string(cg), want)
		if uid == "" {
			continue
		}
		start := startTime(filepath.Join(root, e.Name(), "stat"))
		if b, ok := best[uid]; ok && (b.start < start || (b.start == start && b.pid < pid)) {
			continue
		}
		best[uid] = found{pid: pid, start: start, cgroup: podDir}
	}
	out := make(map[string]Netns, len(best))
	for uid, f := range best {
		path := filepath.Join(root, strconv.Itoa(f.pid), "ns", "net")
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			continue // exited since
		}
		out[uid] = Netns{Path: r.stablePath(path, st), CgroupPath: f.cgroup}
	}
	return out, nil
}

// stablePath returns a bind mount of the namespace in NetnsDirs, or path.
func (r ProcResolver) stablePath(path string, ns syscall.Stat_t) string {
	for _, dir := range r.NetnsDirs {
		entries, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range entries {
			p := filepath.Join(dir, e.Name())
			var st syscall.Stat_t
			if syscall.Stat(p, &st) == nil && st.Ino == ns.Ino && st.Dev == ns.Dev {
				return p
			}
		}
	}
	return path
}

// matchCgroup returns the pod UID whose fragment appears in the cgroup v2
// line ("0::/path") of a /proc/<pid>/cgroup file, and the pod's cgroup
// directory relative to the cgroup2 root (the path up to that fragment).
func matchCgroup(content string, want map[string]string) (uid, podDir string) {
	sc := bufio.NewScanner(strings.NewReader(content))
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, "0::")
		if !ok {
			// cgroup v1 hierarchies name the pod the same way.
			if i := strings.LastIndex(line, ":"); i >= 0 {
				rest = line[i+1:]
			}
		}
		parts := strings.Split(rest, "/")
		for i, p := range parts {
			for frag, u := range want {
				// "pod<uid>" or "kubepods-besteffort-pod<uid_>.slice"
				if p == frag || strings.HasSuffix(strings.TrimSuffix(p, ".slice"), "-"+frag) {
					if ok {
						podDir = strings.Join(parts[:i+1], "/")
					}
					return u, podDir
				}
			}
		}
	}
	return "", ""
}

// startTime is field 22 of /proc/<pid>/stat (clock ticks after boot); 0 if unknown.
func startTime(path string) uint64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')') // the command may hold spaces and parens
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	// After ")": state is field 3, so starttime (22) is index 22-3 = 19.
	if len(f) < 20 {
		return 0
	}
	n, _ := strconv.ParseUint(f[19], 10, 64)
	return n
}
