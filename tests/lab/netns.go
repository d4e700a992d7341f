package lab

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// inNetNS runs fn on a locked OS thread that has joined ns, then restores the
// thread's network namespace. If the restore fails the thread stays locked, so
// the Go runtime discards it instead of reusing a thread in the wrong namespace.
func inNetNS(ns netns.NsHandle, fn func() error) error {
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

// newNamedNS creates a network namespace bound at /run/netns/name without
// moving the calling goroutine into it.
func newNamedNS(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return netns.None(), fmt.Errorf("get current netns: %w", err)
	}
	defer orig.Close()
	h, newErr := netns.NewNamed(name)
	if err := netns.Set(orig); err != nil {
		return netns.None(), fmt.Errorf("restore netns after creating %s: %w", name, err)
	}
	runtime.UnlockOSThread()
	if newErr != nil {
		return netns.None(), fmt.Errorf("create netns %s: %w", name, newErr)
	}
	return h, nil
}
