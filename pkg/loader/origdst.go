package loader

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// ErrNotCaptured reports that a connection has no recorded original
// destination: it was not redirected by warren (or its client has gone).
var ErrNotCaptured = errors.New("connection was not captured")

// OriginalDst returns the destination the client connected to before
// capture redirected it to the outbound listener, for a connection accepted
// on that listener. It costs one getsockopt (the socket's netns cookie) and
// one map lookup. The record lives until the accepted connection closes.
func (l *Loader) OriginalDst(conn *net.TCPConn) (netip.AddrPort, error) {
	local, ok1 := conn.LocalAddr().(*net.TCPAddr)
	remote, ok2 := conn.RemoteAddr().(*net.TCPAddr)
	if !ok1 || !ok2 {
		return netip.AddrPort{}, errors.New("original dst: connection has no TCP addresses")
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: %w", err)
	}
	var (
		cookie uint64
		gerr   error
	)
	if err := rc.Control(func(fd uintptr) {
		cookie, gerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	}); err != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: %w", err)
	}
	if gerr != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: getsockopt SO_NETNS_COOKIE: %w", gerr)
	}
	return l.lookupOrig(cookie, remote.AddrPort(), local.AddrPort())
}

func (l *Loader) lookupOrig(netns uint64, client, listener netip.AddrPort) (netip.AddrPort, error) {
	var d wrDst
	if err := l.orig.Lookup(tupleKey(netns, client, listener), &d); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return netip.AddrPort{}, fmt.Errorf("original dst of %s->%s: %w", client, listener, ErrNotCaptured)
		}
		return netip.AddrPort{}, fmt.Errorf("original dst of %s->%s: %w", client, listener, err)
	}
	return dstAddrPort(d), nil
}
