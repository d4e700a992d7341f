package netnsx

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// OnDisposableThread runs fn on an OS thread that is thrown away afterwards
// (its goroutine ends locked), for work that changes the thread's namespaces
// for good (setns of a cgroup namespace, unshare of a mount namespace). It
// never uses the process's main thread: the runtime keeps a main thread
// whose goroutine ended locked instead of exiting it, and /proc/self/...
// (mountinfo, net, ns) describes the main thread, so it must stay in the
// process's own namespaces.
func OnDisposableThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			// The main thread: hold it (so no goroutine can get it) while
			// another goroutine, necessarily on another thread, does the work.
			inner := make(chan error, 1)
			go func() {
				runtime.LockOSThread() // never unlocked
				inner <- fn()
			}()
			err := <-inner
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		errc <- fn() // never unlocked: the thread ends with this goroutine
	}()
	return <-errc
}
