package loader

import (
	"context"
	"errors"
	"fmt"
	bpffsmnt "github.com/warren-mesh/warren/internal/bpffs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/cgroup2"
	"github.com/warren-mesh/warren/internal/testenv"
)

// Test environment, the kernel selftests' way: every run has a prefix
// (wrlt<pid>); each test gets its own cgroup under the cgroup2 mount (the
// test process moves into it, so its sockets are under the attach point, and
// back out at the end), its own bpffs (mounted by Open at the pin dir's
// parent, under the temp dir) and throwaway network namespaces with
// loopback or 198.18.0.0/15 and 2001:2::/48 addresses only. Leftovers of dead
// runs are removed before the first test.

const testPrefix = "wrlt"

var (
	staleOnce sync.Once
	envSeq    atomic.Int32
)

func runPrefix() string { return testPrefix + strconv.Itoa(os.Getpid()) }

// pidOfPrefixed returns the pid in a name "wrlt<pid>-...", or -1.
func pidOfPrefixed(name string) int {
	rest, ok := strings.CutPrefix(name, testPrefix)
	if !ok {
		return -1
	}
	digits, _, _ := strings.Cut(rest, "-")
	pid, err := strconv.Atoi(digits)
	if err != nil {
		return -1
	}
	return pid
}

func deadPrefixed(name string) bool {
	pid := pidOfPrefixed(name)
	if pid <= 0 || pid == os.Getpid() {
		return false
	}
	return unix.Kill(pid, 0) == unix.ESRCH
}

// removeStale removes netns, bpffs mounts and cgroups left by dead runs.
func removeStale(t testing.TB) {
	if ents, err := os.ReadDir("/var/run/netns"); err == nil {
		for _, e := range ents {
			if deadPrefixed(e.Name()) {
				t.Logf("removing stale netns %s", e.Name())
				_ = netns.DeleteNamed(e.Name())
			}
		}
	}
	if ents, err := os.ReadDir(os.TempDir()); err == nil {
		for _, e := range ents {
			if deadPrefixed(e.Name()) {
				dir := filepath.Join(os.TempDir(), e.Name())
				t.Logf("removing stale bpffs %s", dir)
				_ = Uninstall(filepath.Join(dir, "warren"))
				_ = unix.Unmount(dir, unix.MNT_DETACH)
				_ = os.Remove(dir)
			}
		}
	}
	if mnt, err := cgroup2.Mount(); err == nil {
		if ents, err := os.ReadDir(mnt); err == nil {
			for _, e := range ents {
				if deadPrefixed(e.Name()) {
					t.Logf("removing stale cgroup %s", e.Name())
					_ = cgroup2.Remove(filepath.Join(mnt, e.Name()))
				}
			}
		}
	}
}

type env struct {
	t      testing.TB
	name   string // per-test prefix
	cgroup string
	pinDir string
	cfg    Config
	l      *Loader
}

// newEnv creates the cgroup and bpffs of one test and opens a loader there.
func newEnv(t testing.TB, cfg Config) *env {
	t.Helper()
	testenv.RequireRoot(t)
	staleOnce.Do(func() { removeStale(t) })
	e := &env{t: t, name: fmt.Sprintf("%s-%d", runPrefix(), envSeq.Add(1))}

	e.enterCgroup()

	bpffs := filepath.Join(os.TempDir(), e.name+"-bpf")
	if err := os.MkdirAll(bpffs, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if on, _ := bpffsmnt.IsMounted(bpffs); on {
			if err := unix.Unmount(bpffs, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", bpffs, err)
			}
		}
		if err := os.Remove(bpffs); err != nil {
			t.Errorf("remove %s: %v", bpffs, err)
		}
	})
	e.pinDir = filepath.Join(bpffs, "warren")
	cfg.CgroupPath = e.cgroup
	cfg.PinDir = e.pinDir
	e.cfg = cfg
	t.Cleanup(func() {
		if err := Uninstall(e.pinDir); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	e.open()
	return e
}

// newBareEnv is newEnv without a loader: the cgroup and netns only.
func newBareEnv(t testing.TB) *env {
	t.Helper()
	testenv.RequireRoot(t)
	staleOnce.Do(func() { removeStale(t) })
	e := &env{t: t, name: fmt.Sprintf("%s-%d", runPrefix(), envSeq.Add(1))}
	e.enterCgroup()
	return e
}

// enterCgroup creates the test's cgroup and moves the test process into it
// (all threads: cgroup.procs moves a whole process); cleanup moves it back.
func (e *env) enterCgroup() {
	t := e.t
	t.Helper()
	mnt, err := cgroup2.Mount()
	if err != nil {
		t.Fatal(err)
	}
	e.cgroup = filepath.Join(mnt, e.name)
	if err := cgroup2.Create(e.cgroup); err != nil {
		t.Fatal(err)
	}
	orig, err := cgroup2.OfProcess(0)
	if err != nil {
		t.Fatal(err)
	}
	if err := cgroup2.AddProc(e.cgroup, os.Getpid()); err != nil {
		_ = cgroup2.Remove(e.cgroup)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cgroup2.AddProc(orig, os.Getpid()); err != nil {
			t.Errorf("leave test cgroup: %v", err)
		}
		if err := cgroup2.Remove(e.cgroup); err != nil {
			t.Errorf("remove test cgroup: %v", err)
		}
	})
}

// open (re)opens the loader with e.cfg.
func (e *env) open() {
	e.t.Helper()
	l, err := Open(e.cfg)
	if err != nil {
		e.t.Fatalf("open loader: %v", err)
	}
	e.l = l
	e.t.Cleanup(func() { l.Close() })
}

// testNS is a throwaway named network namespace with loopback up.
type testNS struct {
	name string
	path string
	h    netns.NsHandle
}

func (e *env) newNS(short string) *testNS {
	t := e.t
	t.Helper()
	name := e.name + "-" + short
	var (
		h   netns.NsHandle
		err error
	)
	func() {
		runtime.LockOSThread()
		orig, gerr := netns.Get()
		if gerr != nil {
			runtime.UnlockOSThread()
			err = gerr
			return
		}
		defer orig.Close()
		h, err = netns.NewNamed(name)
		if serr := netns.Set(orig); serr != nil {
			t.Fatalf("return to netns: %v", serr) // thread stays locked and dies
		}
		runtime.UnlockOSThread()
	}()
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	n := &testNS{name: name, path: filepath.Join("/var/run/netns", name), h: h}
	t.Cleanup(func() {
		if err := n.remove(); err != nil {
			t.Error(err)
		}
	})
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	lo, err := nh.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := nh.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	return n
}

// remove closes the handle and deletes the namespace (idempotent).
func (n *testNS) remove() error {
	if n.h != -1 {
		n.h.Close()
		n.h = -1
	}
	if err := netns.DeleteNamed(n.name); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete netns %s: %w", n.name, err)
	}
	return nil
}

// do runs fn on a locked OS thread inside the namespace.
func (n *testNS) do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(n.h); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("return to netns: %w", err) // thread stays locked and dies
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// listen opens a TCP listener inside the namespace.
func (n *testNS) listen(t testing.TB, network, addr string) *net.TCPListener {
	t.Helper()
	var ln net.Listener
	// Plain TCP, as the agent's listeners must be: Go >= 1.24 listens with
	// MPTCP by default, and a sockmap cannot hold an MPTCP socket.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	if err := n.do(func() (err error) {
		ln, err = lc.Listen(context.Background(), network, addr)
		return err
	}); err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, n.name, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener)
}

// socket creates a TCP socket inside the namespace for dst's family (an
// IPv4-mapped dst gets an IPv6 socket, as Java makes them).
func (n *testNS) socket(dst netip.AddrPort, mark int) (int, error) {
	var fd int
	err := n.do(func() (err error) {
		fam := unix.AF_INET6
		if dst.Addr().Is4() {
			fam = unix.AF_INET
		}
		fd, err = unix.Socket(fam, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if err != nil {
			return err
		}
		if fam == unix.AF_INET6 {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
				unix.Close(fd)
				return err
			}
		}
		if mark != 0 {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, mark); err != nil {
				unix.Close(fd)
				return err
			}
		}
		return nil
	})
	return fd, err
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

func sockname(fd int) netip.AddrPort {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// dialOpts tune dial.
type dialOpts struct {
	mark int
	bind netip.AddrPort
}

// dial connects from inside the namespace to dst with a raw socket (so an
// IPv4-mapped destination stays IPv6 on the wire API) and returns the
// connection and its local address.
func (n *testNS) dial(dst netip.AddrPort, o dialOpts) (net.Conn, netip.AddrPort, error) {
	fd, err := n.socket(dst, o.mark)
	if err != nil {
		return nil, netip.AddrPort{}, fmt.Errorf("socket: %w", err)
	}
	if o.bind.IsValid() {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		if err := unix.Bind(fd, sockaddr(o.bind)); err != nil {
			unix.Close(fd)
			return nil, netip.AddrPort{}, fmt.Errorf("bind %s: %w", o.bind, err)
		}
	}
	if err := unix.Connect(fd, sockaddr(dst)); err != nil {
		unix.Close(fd)
		return nil, netip.AddrPort{}, fmt.Errorf("connect %s: %w", dst, err)
	}
	local := sockname(fd)
	f := os.NewFile(uintptr(fd), "client")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	return c, local, nil
}

// accepted is one connection accepted by an acceptor.
type accepted struct {
	conn   *net.TCPConn
	remote netip.AddrPort
}

// acceptor accepts connections on ln and delivers them on a channel.
func acceptor(t testing.TB, ln *net.TCPListener) <-chan accepted {
	ch := make(chan accepted, 2048)
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				close(ch)
				return
			}
			t.Cleanup(func() { c.Close() })
			ch <- accepted{conn: c, remote: unmapAP(c.RemoteAddr().(*net.TCPAddr).AddrPort())}
		}
	}()
	return ch
}

func unmapAP(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// next waits for a connection from client on ch.
func next(t testing.TB, ch <-chan accepted, client netip.AddrPort) *net.TCPConn {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case a, ok := <-ch:
			if !ok {
				t.Fatalf("listener closed waiting for %s", client)
			}
			if a.remote == client {
				return a.conn
			}
			a.conn.Close()
		case <-timeout:
			t.Fatalf("no connection from %s", client)
		}
	}
}

// none asserts that nothing arrives on ch for a short while.
func none(t testing.TB, ch <-chan accepted, what string) {
	t.Helper()
	select {
	case a := <-ch:
		t.Fatalf("%s: unexpected connection from %s", what, a.remote)
	case <-time.After(50 * time.Millisecond):
	}
}

func isUnreachable(err error) bool {
	return errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EHOSTUNREACH)
}
