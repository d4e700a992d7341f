package netnsx

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// WriteSysctl sets a per-network-namespace sysctl ("net.ipv4.tcp_migrate_req")
// in ns. /proc/sys/net resolves against the network namespace of the thread
// that opens the file, so the write runs on a thread that joined ns. In a
// container /proc/sys is a read-only bind mount (the runtime's readonly
// paths), even for a process with CAP_SYS_ADMIN and CAP_NET_ADMIN; then the
// thread also unshares its mount namespace, makes it a slave of the
// container's (nothing propagates back), remounts its /proc/sys read-write
// and writes. The container's /proc/sys stays read-only for every other
// thread and process, and the thread is discarded afterwards
// (OnDisposableThread), so no goroutine ever runs in its namespaces.
func WriteSysctl(ns netns.NsHandle, name, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(name, ".", "/")
	err := OnDisposableThread(func() error {
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter netns: %w", err)
		}
		return writeSysctlHere(path, value)
	})
	if err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// writeSysctlHere writes path on the calling (locked, disposable) thread,
// through a private read-write remount of /proc/sys when it is read-only.
func writeSysctlHere(path, value string) error {
	err := os.WriteFile(path, []byte(value), 0o644)
	if err == nil || !errors.Is(err, unix.EROFS) {
		return err
	}
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("%s is read-only and a private mount namespace failed: %w", path, err)
	}
	if err := unix.Mount("", "/", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make the thread's mounts slaves: %w", err)
	}
	if err := unix.Mount("", "/proc/sys", "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("%s is read-only; remount /proc/sys read-write in a private mount namespace: %w", path, err)
	}
	return os.WriteFile(path, []byte(value), 0o644)
}
