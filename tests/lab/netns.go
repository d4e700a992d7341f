package lab

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"

	"github.com/warren-mesh/warren/internal/netnsx"
)

// inNetNS runs fn inside ns; see netnsx.Do.
func inNetNS(ns netns.NsHandle, fn func() error) error { return netnsx.Do(ns, fn) }

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
