package netnsx

import (
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/testenv"
)

// newNetns makes an unnamed network namespace for the test.
func newNetns(t *testing.T) netns.NsHandle {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		t.Fatal(err)
	}
	if err := netns.Set(orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

func readIn(t *testing.T, ns netns.NsHandle, path string) string {
	t.Helper()
	var v string
	if err := Do(ns, func() error {
		b, err := os.ReadFile(path)
		v = strings.TrimSpace(string(b))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestWriteSysctl sets a per-netns sysctl in a scratch namespace, and again
// from a process whose /proc/sys is read-only (a child in its own mount
// namespace, as in a container) through the private remount.
func TestWriteSysctl(t *testing.T) {
	testenv.RequireRoot(t)
	const key, path = "net.ipv4.tcp_migrate_req", "/proc/sys/net/ipv4/tcp_migrate_req"
	hostRead := func() string { b, _ := os.ReadFile(path); return strings.TrimSpace(string(b)) }
	host := hostRead()
	ns := newNetns(t)
	if err := WriteSysctl(ns, key, "1"); err != nil {
		t.Fatal(err)
	}
	if got := readIn(t, ns, path); got != "1" {
		t.Errorf("%s in the namespace = %s, want 1", key, got)
	}
	if got := hostRead(); got != host {
		t.Errorf("the host's %s changed: %s -> %s", key, host, got)
	}

	// Read-only /proc/sys: on a thread of its own mount namespace.
	ns2 := newNetns(t)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // discarded: its mount namespace is private
		errc <- func() error {
			if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
				return err
			}
			if err := unix.Mount("", "/", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
				return err
			}
			if err := unix.Mount("/proc/sys", "/proc/sys", "", unix.MS_BIND, ""); err != nil {
				return err
			}
			if err := unix.Mount("", "/proc/sys", "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
				return err
			}
			if err := netns.Set(ns2); err != nil {
				return err
			}
			if err := os.WriteFile(path, []byte("1"), 0o644); err == nil {
				t.Error("the read-only /proc/sys took a write")
			}
			// writeSysctlHere is WriteSysctl's body on this (read-only) thread.
			return writeSysctlHere(path, "1")
		}()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if got := readIn(t, ns2, path); got != "1" {
		t.Errorf("%s through a read-only /proc/sys = %s, want 1", key, got)
	}
}
