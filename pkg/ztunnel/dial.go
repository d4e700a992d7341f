package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/netnsx"
	"github.com/warren-mesh/warren/pkg/loader"
)

// markControl marks a socket the agent opens, so capture skips it. Together
// with listenControl it is the one place sockets get their options.
func markControl(_, _ string, c syscall.RawConn) error {
	return setsockopts(c, unix.SO_MARK, loader.Mark)
}

// listenControl marks a listener and sets SO_REUSEPORT, so that a restarting
// agent binds beside the old one and no connect is refused in between.
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

// maxNetnsDials bounds the dials in progress inside pod namespaces: each
// holds an OS thread (namespaces belong to threads) until it connects or
// times out, and a pod dialing a black hole must not exhaust the agent's
// threads.
const maxNetnsDials = 512

// dialIn connects to dst from inside pd's network namespace with the agent's
// mark, optionally from src.
func (p *Proxy) dialIn(ctx context.Context, pd *pod, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	select {
	case p.dialSem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("dial %s: %d dials already in progress: %w", dst, maxNetnsDials, ctx.Err())
	}
	defer func() { <-p.dialSem }()
	var c *net.TCPConn
	err := pd.withNS(func(ns netns.NsHandle) (err error) {
		c, err = dialInNS(ctx, ns, src, dst)
		return err
	})
	return c, err
}

// dialInNS connects to dst from inside ns, optionally from src, with the agent's mark.
func dialInNS(ctx context.Context, ns netns.NsHandle, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{Control: markControl}
	d.SetMultipathTCP(false)
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	var c net.Conn
	err := netnsx.Do(ns, func() (err error) {
		c, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// unmap turns a dual-stack socket's IPv4-mapped address into plain IPv4.
func unmap(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }

// reset closes c with an RST instead of a FIN, so the client sees a refusal at once.
func reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}
