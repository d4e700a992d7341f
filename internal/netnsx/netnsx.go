// Package netnsx runs code inside another network namespace.
//
// Network namespaces belong to OS threads, so Do locks the goroutine to its
// thread, switches, runs the function, and switches back. Sockets created
// inside keep their namespace after Do returns: that is how the agent opens
// listeners in each pod and dials from a pod's address.
package netnsx

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn on a locked OS thread that has joined ns, then restores the
// thread's namespace. If the restore fails the thread stays locked, so the Go
// runtime discards it instead of reusing a thread in the wrong namespace.
func Do(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("get current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns: %w", err)
	}
	fnErr := fn()
	if err := netns.Set(orig); err != nil {
		return fmt.Errorf("restore netns: %w (thread discarded)", err)
	}
	runtime.UnlockOSThread()
	return fnErr
}

// DoPath runs fn inside the network namespace at path (/run/netns/NAME or
// /proc/PID/ns/net).
func DoPath(path string, fn func() error) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	if err := Do(ns, fn); err != nil {
		return fmt.Errorf("in netns %s: %w", path, err)
	}
	return nil
}
