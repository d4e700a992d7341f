package cluster

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	// prefixPattern matches the prefixes of cluster runs and nothing else on a host.
	prefixPattern = `^wk[a-z0-9]{6}$`
	lockDir       = "/run/warren-cluster"
	stateRoot     = "/var/lib/warren-cluster"
	cgroupV1Root  = "/sys/fs/cgroup"
	netnsDir      = "/var/run/netns"
	cniCacheDir   = "/var/lib/cni/results"
)

var prefixRE = regexp.MustCompile(prefixPattern)

// globalLock serializes cluster runs on a host: kube-proxy's nftables tables
// and the host's sysctls are not per run.
func globalLock() (*os.File, error) {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return nil, err
	}
	path := filepath.Join(lockDir, "host.lock")
	for {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			return nil, err
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			f.Close()
			return nil, err
		}
		// The holder removes the file when it is done: a lock on a removed
		// file is no lock; open the new one.
		var a, b unix.Stat_t
		if unix.Fstat(int(f.Fd()), &a) == nil && unix.Stat(path, &b) == nil && a.Ino == b.Ino {
			return f, nil
		}
		f.Close()
	}
}

// releaseHost removes the host lock file (so nothing of the run stays in
// /run) and releases the lock.
func releaseHost(f *os.File) {
	os.Remove(f.Name())
	os.Remove(lockDir) // only when empty
	f.Close()
}

func acquireLock(prefix string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(lockDir, prefix+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("cluster: prefix %s in use: %w", prefix, err)
	}
	fmt.Fprintf(f, "%d\n", os.Getpid())
	return f, nil
}

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

// unifiedRoot is the cgroup2 mount (/sys/fs/cgroup/unified on hybrid hosts).
func unifiedRoot() string {
	if m, err := cgroup2Mount(); err == nil {
		return m
	}
	return ""
}

func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if ok && strings.HasPrefix(post, "cgroup2 ") {
			if fl := strings.Fields(pre); len(fl) >= 5 {
				return fl[4], nil
			}
		}
	}
	return "", errors.New("no cgroup2 mount")
}

// cgroupDirs lists every hierarchy's directory for prefix (v1 controllers and the unified tree).
func cgroupDirs(prefix string) []string {
	var out []string
	seen := map[string]bool{}
	if u := unifiedRoot(); u != "" {
		out, seen[u] = append(out, filepath.Join(u, prefix)), true
	}
	entries, _ := os.ReadDir(cgroupV1Root)
	for _, e := range entries {
		d := filepath.Join(cgroupV1Root, e.Name())
		if seen[d] || !e.IsDir() {
			continue
		}
		var st unix.Statfs_t
		if unix.Statfs(d, &st) == nil && st.Type == unix.CGROUP_SUPER_MAGIC {
			out = append(out, filepath.Join(d, prefix))
		}
	}
	return out
}

// Leftovers lists the prefixes of cluster runs with objects on this host, live or stale.
func Leftovers() ([]string, error) {
	seen := map[string]bool{}
	for _, dir := range []string{lockDir, stateRoot, unifiedRoot()} {
		if dir == "" {
			continue
		}
		entries, err := os.ReadDir(dir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		for _, e := range entries {
			if p := strings.TrimSuffix(e.Name(), ".lock"); prefixRE.MatchString(p) {
				seen[p] = true
			}
		}
	}
	links, _ := netlink.LinkList()
	for _, l := range links {
		if p, ok := strings.CutSuffix(l.Attrs().Name, "br"); ok && prefixRE.MatchString(p) {
			seen[p] = true
		}
	}
	out := make([]string, 0, len(seen))
	for p := range seen {
		out = append(out, p)
	}
	sort.Strings(out)
	return out, nil
}

// CleanStale removes every object of cluster runs whose process no longer
// holds their lock. It backs make clean-lab.
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
		if err := removeRun(p, func(string, ...any) {}); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killCgroups SIGKILLs every process in the run's cgroup trees (its daemons,
// containerd's shims and the pods' containers) until none is left.
func killCgroups(prefix string) error {
	for i := 0; i < 50; i++ {
		n := 0
		for _, root := range cgroupDirs(prefix) {
			filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
				if err != nil || !d.IsDir() {
					return nil
				}
				b, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
				for _, f := range strings.Fields(string(b)) {
					if pid, _ := strconv.Atoi(f); pid > 0 && pid != os.Getpid() {
						syscall.Kill(pid, syscall.SIGKILL)
						n++
					}
				}
				return nil
			})
		}
		if n == 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("cluster %s: processes left in its cgroups", prefix)
}

func rmCgroups(prefix string) error {
	var errs []error
	for _, root := range cgroupDirs(prefix) {
		var dirs []string
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			var err error
			for try := 0; try < 20; try++ {
				if err = os.Remove(dirs[i]); err == nil || errors.Is(err, fs.ErrNotExist) {
					err = nil
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// unmountUnder unmounts every mount at or below dir, deepest first.
func unmountUnder(dir string) error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var mps []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			mps = append(mps, f[4])
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(mps)))
	var errs []error
	for _, m := range mps {
		if err := unix.Unmount(m, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				errs = append(errs, fmt.Errorf("umount %s: %w", m, err))
			}
		}
	}
	return errors.Join(errs...)
}

// readLines reads a record file of the run (one entry a line); missing is empty.
func readLines(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

func appendLine(path, line string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintln(f, line)
	return err
}

// removeRun deletes everything named with prefix or recorded in its state
// directory; idempotent. The record files in the state directory say what
// the run changed on the host: netns.before (network namespaces that existed
// before containerd started), sysctl.saved, shared-mounts, created-paths.
func removeRun(prefix string, logf func(string, ...any)) error {
	state, run := filepath.Join(stateRoot, prefix), filepath.Join(lockDir, prefix)
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	add(killCgroups(prefix))
	add(unmountUnder(run))
	add(unmountUnder(state))
	// Pods' network namespaces: cni-* made by the run's containerd (those absent before it started).
	if before := readLines(filepath.Join(state, "netns.before")); before != nil || fileExists(filepath.Join(state, "netns.before")) {
		had := map[string]bool{}
		for _, n := range before {
			had[n] = true
		}
		entries, _ := os.ReadDir(netnsDir)
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), "cni-") && !had[e.Name()] {
				p := filepath.Join(netnsDir, e.Name())
				unix.Unmount(p, unix.MNT_DETACH)
				if err := os.Remove(p); err == nil {
					logf("removed netns %s", e.Name())
				}
			}
		}
	}
	// kube-proxy's tables (one cluster per host at a time: the host lock;
	// make clean-lab runs without it, so it leaves them to a live run).
	others, _ := Leftovers()
	live := false
	for _, o := range others {
		live = live || (o != prefix && alive(o))
	}
	for _, fam := range []string{"ip", "ip6"} {
		if live {
			break
		}
		if exec.Command("nft", "list", "table", fam, "kube-proxy").Run() == nil {
			add(exec.Command("nft", "delete", "table", fam, "kube-proxy").Run())
			logf("deleted nft table %s kube-proxy", fam)
		}
	}
	if l, err := netlink.LinkByName(prefix + "br"); err == nil {
		links, _ := netlink.LinkList()
		for _, v := range links {
			if v.Attrs().MasterIndex == l.Attrs().Index {
				netlink.LinkDel(v)
			}
		}
		add(netlink.LinkDel(l))
	}
	add(rmCgroups(prefix))
	for _, kv := range readLines(filepath.Join(state, "sysctl.saved")) {
		if k, v, ok := strings.Cut(kv, "="); ok {
			add(writeSysctl(k, v))
		}
	}
	recs := readLines(filepath.Join(state, "shared-mounts"))
	for i := len(recs) - 1; i >= 0; i-- {
		what, m, _ := strings.Cut(recs[i], " ")
		switch what {
		case "shared":
			add(unix.Mount("", m, "", unix.MS_PRIVATE, ""))
		case "bind":
			add(unix.Unmount(m, 0))
		}
	}
	for _, p := range readLines(filepath.Join(state, "created-paths")) {
		if strings.HasPrefix(p, "/sys/fs/bpf/") {
			unmountUnder(p)
		}
		os.RemoveAll(p)
	}
	if matches, _ := filepath.Glob(filepath.Join(cniCacheDir, prefix+"-*")); len(matches) > 0 {
		for _, m := range matches {
			os.Remove(m)
		}
	}
	add(os.RemoveAll(run))
	add(os.RemoveAll(state))
	os.Remove(stateRoot)
	os.Remove(filepath.Join(lockDir, prefix+".lock"))
	if len(errs) > 0 {
		return fmt.Errorf("cluster: remove run %s: %w", prefix, errors.Join(errs...))
	}
	return nil
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func sysctlPath(k string) string { return "/proc/sys/" + strings.ReplaceAll(k, ".", "/") }

func readSysctl(k string) (string, error) {
	b, err := os.ReadFile(sysctlPath(k))
	return strings.TrimSpace(string(b)), err
}

func writeSysctl(k, v string) error { return os.WriteFile(sysctlPath(k), []byte(v), 0o644) }
