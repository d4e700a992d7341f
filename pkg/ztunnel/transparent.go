package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/netnsx"
	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/transparent"
)

// Source address preservation: the app in an enrolled pod sees the real
// client's address on inbound connections. The agent connects to the app
// from that address (IP_TRANSPARENT, SO_MARK loader.TransparentMark), and
// pkg/transparent's policy routing inside the pod brings the app's answers
// back to the agent. The client's port is not kept: the kernel picks one.
// For HBONE, the tunnel's source port is shared by every stream of the
// tunnel and the app's own port (Forwarded) is only the source agent's
// word; for plaintext, the client's real port would give the agent's
// connect the very 4-tuple of the connection it accepted, which the kernel
// then delivers to the agent's own socket.

// transparentNetns is a Netns that can preserve source addresses (hostNetns is one).
type transparentNetns interface {
	// SetupTransparent installs the pod's policy routing (idempotent).
	SetupTransparent(o transparent.Options) error
	// TeardownTransparent removes it.
	TeardownTransparent() error
	// DialTransparent connects to dst from src, an address the pod does
	// not own, with the transparent mark.
	DialTransparent(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error)
}

func (n *hostNetns) SetupTransparent(o transparent.Options) error {
	return n.do(func(h netns.NsHandle) error { return transparent.Setup(h, o) })
}

func (n *hostNetns) TeardownTransparent() error {
	return n.do(func(h netns.NsHandle) error { return transparent.Teardown(h) })
}

func (n *hostNetns) DialTransparent(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	var fd int
	err := n.do(func(h netns.NsHandle) error {
		return netnsx.Do(h, func() (err error) {
			fam := unix.AF_INET6
			if dst.Addr().Is4() {
				fam = unix.AF_INET
			}
			fd, err = unix.Socket(fam, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
			if err != nil {
				return fmt.Errorf("socket: %w", err)
			}
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	if err := transparent.Control(fd, dst.Addr().Is4()); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// Bind now (not at connect) so the port is known for the loop guard.
	if err := unix.Bind(fd, sockaddr(netip.AddrPortFrom(src, 0))); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind %s: %w", src, err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("getsockname: %w", err)
	}
	key := tpKey{src: netip.AddrPortFrom(src, uint16(portOf(sa))), dst: dst}
	ownTransparent.Store(key, struct{}{})
	defer ownTransparent.Delete(key)
	return connect(ctx, fd, dst)
}

func portOf(sa unix.Sockaddr) int {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return sa.Port
	case *unix.SockaddrInet6:
		return sa.Port
	}
	return 0
}

// tpKey is a transparent connect in flight: from the client's address (and
// the port the kernel chose) to the app.
type tpKey struct{ src, dst netip.AddrPort }

// ownTransparent holds the agent's transparent connects in flight. BPF lets
// their SYNs through to the app; if it could not (wr_tpass full), sk_lookup
// steers one to the agent's own inbound listener, and handlePlaintext must
// refuse it instead of dialing again (a loop).
var ownTransparent sync.Map

// isOwnTransparent reports whether an accepted plaintext connection (remote,
// local) is one of the agent's own transparent connects.
func isOwnTransparent(remote, local netip.AddrPort) bool {
	_, ok := ownTransparent.Load(tpKey{src: remote, dst: local})
	return ok
}

// errSourceMismatch reports an HBONE peer whose certificate identity does not
// own the address the tunnel comes from.
var errSourceMismatch = errors.New("source address is not a workload of the peer's identity")

// verifySource checks that src, the tunnel's TCP source, belongs to a
// workload of identity peer in network. It fails closed: an unknown address
// or a workload of another identity is refused, as ztunnel does.
func verifySource(snap *config.Snapshot, network string, src netip.Addr, peer string) error {
	w, ok := snap.WorkloadByIP(network, src)
	switch {
	case !ok:
		return fmt.Errorf("%w: no workload has address %s (peer %s)", errSourceMismatch, src, peer)
	case w.Identity() != peer:
		return fmt.Errorf("%w: %s is %s, whose identity is %s, not %s", errSourceMismatch, src, w, w.Identity(), peer)
	}
	return nil
}

// setupTransparent prepares pd's namespace for source preservation. A
// namespace that cannot (a fake, a missing capability) keeps working with
// the pod's own address as the source, and says so.
func (p *Proxy) setupTransparent(pd *pod) {
	tn, ok := pd.ns.(transparentNetns)
	if !ok {
		return
	}
	var o transparent.Options
	for _, ip := range pd.workload().WorkloadIPs {
		o.IPv4 = o.IPv4 || ip.Unmap().Is4()
		o.IPv6 = o.IPv6 || !ip.Unmap().Is4()
	}
	if err := tn.SetupTransparent(o); err != nil {
		p.log.Warn("source address preservation unavailable: apps see the pod's own address as the source", "workload", pd.workload().String(), "err", err)
		return
	}
	pd.transparent.Store(true)
}

// teardownTransparent removes what setupTransparent installed.
func (p *Proxy) teardownTransparent(pd *pod) {
	tn, ok := pd.ns.(transparentNetns)
	if !ok || !pd.transparent.Load() {
		return
	}
	if err := tn.TeardownTransparent(); err != nil {
		p.log.Error("remove source-preservation routing", "workload", pd.workload().String(), "err", err)
	}
}

// dialApp connects to the app at dst inside pd from the client's address src
// when the pod preserves sources and src is of dst's family and not the
// pod's own; otherwise from the pod's own address.
func (p *Proxy) dialApp(ctx context.Context, pd *pod, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	src = src.Unmap()
	tn, ok := pd.ns.(transparentNetns)
	if !ok || !pd.transparent.Load() || !src.IsValid() || src.Is4() != dst.Addr().Unmap().Is4() || src.IsLoopback() {
		return p.dialIn(ctx, pd, netip.Addr{}, dst)
	}
	c, err := tn.DialTransparent(ctx, src, netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port()))
	if errors.Is(err, errPodGone) {
		return nil, fmt.Errorf("dial %s from %s: workload %s: %w", dst, src, pd.workload(), err)
	}
	if err != nil {
		return nil, fmt.Errorf("dial %s from %s: %w", dst, src, err)
	}
	return c, nil
}
