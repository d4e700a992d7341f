// Package cgroup2 finds the host's cgroup v2 mount and manages directories under it.
package cgroup2

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// ErrNotMounted reports that no cgroup2 file system is mounted.
var ErrNotMounted = errors.New("no cgroup2 mount in /proc/self/mountinfo (mount one: mount -t cgroup2 none /sys/fs/cgroup)")

// Mount returns the mount point of the cgroup v2 hierarchy, read from
// /proc/self/mountinfo. Hybrid hosts mount it at /sys/fs/cgroup/unified,
// unified hosts at /sys/fs/cgroup; the first cgroup2 entry wins.
func Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	return parseMountinfo(f)
}

func parseMountinfo(r io.Reader) (string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		// Format: id parent major:minor root mountpoint options [optional...] - fstype source superopts
		line := sc.Text()
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		fields := strings.Fields(pre)
		postFields := strings.Fields(post)
		if len(fields) < 5 || len(postFields) < 1 {
			continue
		}
		if postFields[0] == "cgroup2" {
			return unescape(fields[4]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("scan mountinfo: %w", err)
	}
	return "", ErrNotMounted
}

// unescape decodes the octal escapes (\040 for a space) that mountinfo uses.
func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
