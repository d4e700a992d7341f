package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// netnsRunDir is where `ip netns add` binds named network namespaces.
const netnsRunDir = "/var/run/netns"

// errIPNetnsExec reports that this process was started by `ip netns exec`,
// which runs its command in a new mount namespace with a fresh sysfs on /sys:
// the host's cgroup2 mount (/sys/fs/cgroup or /sys/fs/cgroup/unified) and
// bpffs (/sys/fs/bpf) are not there, so capture cannot attach, and pins made
// on a bpffs mounted in that namespace vanish with it.
type errIPNetnsExec struct{ name string }

func (e errIPNetnsExec) Error() string {
	return fmt.Sprintf("started by `ip netns exec %s`, which mounts a new /sys for its command: /sys/fs/cgroup and /sys/fs/bpf are not the host's here", e.name)
}

// Fix says how to start the same command in that network namespace without
// losing the host's /sys: nsenter joins the network namespace only.
func (e errIPNetnsExec) Fix() string {
	return fmt.Sprintf("start it with nsenter --net=%s nodeagent run ... (nsenter joins only the network namespace; processes meant to join a cgroup need the same)", filepath.Join(netnsRunDir, e.name))
}

// checkNotIPNetnsExec is the check doctor lists and run makes at start.
func checkNotIPNetnsExec() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	name, err := ipNetnsExecName(f, sameNetns)
	if err != nil {
		return "", err
	}
	if name != "" {
		return "", errIPNetnsExec{name}
	}
	return "/sys is not an `ip netns exec` sysfs", nil
}

// ipNetnsExecName returns the network namespace name `ip netns exec` left in
// mountinfo, or "" when it did not start this process. iproute2 mounts the
// sysfs on /sys with the namespace's name as its source (a sysfs is normally
// "sysfs"); a named namespace of that name being this process's own confirms
// it. The last mount on /sys wins, as it hides the earlier ones.
func ipNetnsExecName(mountinfo io.Reader, same func(path string) (bool, error)) (string, error) {
	sc := bufio.NewScanner(mountinfo)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	source := ""
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fields, postFields := strings.Fields(pre), strings.Fields(post)
		if len(fields) < 5 || len(postFields) < 2 || fields[4] != "/sys" {
			continue
		}
		source = ""
		if postFields[0] == "sysfs" {
			source = postFields[1]
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("scan mountinfo: %w", err)
	}
	if source == "" || source == "sysfs" || strings.ContainsAny(source, `/\`) || source == "." || source == ".." {
		return "", nil
	}
	ok, err := same(filepath.Join(netnsRunDir, source))
	if err != nil || !ok {
		return "", err
	}
	return source, nil
}

// sameNetns reports whether path is a bind mount of this process's network
// namespace (a missing path is not).
func sameNetns(path string) (bool, error) {
	var self, named unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &self); err != nil {
		return false, fmt.Errorf("stat own network namespace: %w", err)
	}
	if err := unix.Stat(path, &named); err != nil {
		if os.IsNotExist(err) {
			return false, nil
		}
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
	return self.Dev == named.Dev && self.Ino == named.Ino, nil
}
