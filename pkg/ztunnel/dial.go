package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/netnsx"
	"github.com/warren-mesh/warren/pkg/loader"
)

// listenControl marks a listener (capture skips the agent's sockets) and sets
// SO_REUSEPORT, so that a restarting agent binds beside the old one and no
// connect is refused in between. Dialed sockets get their mark in socketIn.
func listenControl(_, _ string, c syscall.RawConn) error {
	return setsockopts(c, unix.SO_MARK, loader.Mark, unix.SO_REUSEPORT, 1)
}

// setsockopts sets SOL_SOCKET options given as option, value pairs.
func setsockopts(c syscall.RawConn, kv ...int) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		for i := 0; i+1 < len(kv) && serr == nil; i += 2 {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, kv[i], kv[i+1])
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// listenIn opens a TCP listener inside ns. MPTCP, Go's default for
// listeners, is turned off: sk_lookup steers to plain TCP sockets only.
func listenIn(ns netns.NsHandle, addr string) (*net.TCPListener, error) {
	lc := net.ListenConfig{Control: listenControl}
	lc.SetMultipathTCP(false)
	var ln net.Listener
	err := netnsx.Do(ns, func() (err error) {
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// errPodGone reports a dial for a workload whose namespace was released.
var errPodGone = errors.New("workload removed")

// HostNamespaces opens network namespaces from their paths (setns needs
// CAP_SYS_ADMIN).
type HostNamespaces struct{}

// Open opens the namespace at path (/proc/<pid>/ns/net, /var/run/netns/<name>).
func (HostNamespaces) Open(path string) (Netns, error) {
	h, err := netns.GetFromPath(path)
	if err != nil {
		return nil, err
	}
	return &hostNetns{h: h}, nil
}

// hostNetns is a namespace handle; only socket(2) and listen run inside it.
type hostNetns struct {
	mu     sync.RWMutex // held for reading while a socket is made in h
	closed bool
	h      netns.NsHandle
}

// do runs fn with the handle, unless it was released.
func (n *hostNetns) do(fn func(netns.NsHandle) error) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closed {
		return errPodGone
	}
	return fn(n.h)
}

func (n *hostNetns) Listen(addr netip.AddrPort) (ln *net.TCPListener, err error) {
	err = n.do(func(h netns.NsHandle) error {
		ln, err = listenIn(h, addr.String())
		return err
	})
	return ln, err
}

func (n *hostNetns) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	var fd int
	err := n.do(func(h netns.NsHandle) (err error) {
		fd, err = socketIn(h, src, dst.Addr().Is4())
		return err
	})
	if err != nil {
		return nil, err
	}
	return connect(ctx, fd, dst)
}

// Cookie returns the namespace's netns cookie (SO_NETNS_COOKIE of a socket
// made inside it; Linux 5.14).
func (n *hostNetns) Cookie() (cookie uint64, err error) {
	err = n.do(func(h netns.NsHandle) error {
		return netnsx.Do(h, func() error {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
			return err
		})
	})
	return cookie, err
}

func (n *hostNetns) EnableRequestMigration() error {
	// netnsx.WriteSysctl: /proc/sys is read-only in the chart's container.
	return n.do(func(h netns.NsHandle) error { return netnsx.WriteSysctl(h, "net.ipv4.tcp_migrate_req", "1") })
}

// Close releases the handle once no socket is being made in it.
func (n *hostNetns) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	return n.h.Close()
}

// dialIn connects to dst from inside pd's network namespace with the agent's
// mark, optionally from src.
func (p *Proxy) dialIn(ctx context.Context, pd *pod, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	c, err := pd.ns.Dial(ctx, src, dst)
	if errors.Is(err, errPodGone) {
		return nil, fmt.Errorf("dial %s: workload %s: %w", dst, pd.workload(), err)
	}
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", dst, err)
	}
	return c, nil
}

// socketIn creates a marked, non-blocking TCP socket inside ns, bound to src
// when it is valid. Only socket(2) needs the namespace: the thread is locked
// for microseconds, never for a connect.
func socketIn(ns netns.NsHandle, src netip.Addr, v4 bool) (int, error) {
	family := unix.AF_INET6
	if v4 {
		family = unix.AF_INET
	}
	var fd int
	if err := netnsx.Do(ns, func() (err error) {
		fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		return err
	}); err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, loader.Mark); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("set SO_MARK: %w", err)
	}
	if src.IsValid() {
		if err := unix.Bind(fd, sockaddr(netip.AddrPortFrom(src, 0))); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("bind %s: %w", src, err)
		}
	}
	return fd, nil
}

// connect connects the non-blocking socket fd to dst through Go's poller,
// so waiting for the handshake costs no OS thread, and returns it as a
// *net.TCPConn. It owns fd.
func connect(ctx context.Context, fd int, dst netip.AddrPort) (*net.TCPConn, error) {
	f := os.NewFile(uintptr(fd), "tcp")
	defer f.Close() // net.FileConn holds its own descriptor
	err := unix.Connect(fd, sockaddr(dst))
	if errors.Is(err, unix.EINPROGRESS) {
		if d, ok := ctx.Deadline(); ok {
			f.SetWriteDeadline(d)
		}
		stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(time.Unix(1, 0)) })
		defer stop()
		rc, rerr := f.SyscallConn()
		if rerr != nil {
			return nil, rerr
		}
		var soErr error
		werr := rc.Write(func(fd uintptr) bool {
			v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
			switch {
			case err != nil:
				soErr = err
			case v != 0:
				soErr = unix.Errno(v)
			default:
				if _, err := unix.Getpeername(int(fd)); errors.Is(err, unix.ENOTCONN) {
					return false // still connecting: wait until writable
				} else if err != nil {
					soErr = err
				}
			}
			return true
		})
		switch {
		case werr != nil && ctx.Err() != nil:
			return nil, ctx.Err()
		case werr != nil:
			return nil, werr
		}
		err = soErr
	}
	if err != nil {
		return nil, err
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// sockaddr converts an address to the kernel's form.
func sockaddr(a netip.AddrPort) unix.Sockaddr {
	if a.Addr().Is4() {
		return &unix.SockaddrInet4{Port: int(a.Port()), Addr: a.Addr().As4()}
	}
	return &unix.SockaddrInet6{Port: int(a.Port()), Addr: a.Addr().As16()}
}

// unmap turns a dual-stack socket's IPv4-mapped address into plain IPv4.
func unmap(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }

// reset closes c with an RST instead of a FIN, so the client sees a refusal at once.
func reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}
