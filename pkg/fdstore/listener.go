package fdstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNotListener: an fd is not a listening TCP socket.
var ErrNotListener = errors.New("not a listening TCP socket")

// ListenerFromFD returns a listener on a copy of f's fd, after checking that
// the fd is a TCP (or MPTCP) socket (SO_TYPE, SO_DOMAIN, SO_PROTOCOL) in
// LISTEN (SO_ACCEPTCONN). f stays the caller's, to close.
func ListenerFromFD(f *os.File) (*net.TCPListener, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	// Never f.Fd(): it would make the socket, shared with every other
	// holder of it, blocking.
	var cerr error
	if err := rc.Control(func(fd uintptr) { cerr = checkListener(int(fd)) }); err != nil {
		return nil, err
	}
	if cerr != nil {
		return nil, fmt.Errorf("%s: %w", f.Name(), cerr)
	}
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, err
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("%s: %w: %T", f.Name(), ErrNotListener, ln)
	}
	return tl, nil
}

func checkListener(fd int) error {
	get := func(opt int) (int, error) { return unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt) }
	typ, err := get(unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("%w: SO_TYPE: %v", ErrNotListener, err)
	}
	if typ != unix.SOCK_STREAM {
		return fmt.Errorf("%w: SO_TYPE %d, not SOCK_STREAM", ErrNotListener, typ)
	}
	dom, err := get(unix.SO_DOMAIN)
	if err != nil {
		return fmt.Errorf("%w: SO_DOMAIN: %v", ErrNotListener, err)
	}
	if dom != unix.AF_INET && dom != unix.AF_INET6 {
		return fmt.Errorf("%w: SO_DOMAIN %d, not AF_INET or AF_INET6", ErrNotListener, dom)
	}
	proto, err := get(unix.SO_PROTOCOL)
	if err != nil {
		return fmt.Errorf("%w: SO_PROTOCOL: %v", ErrNotListener, err)
	}
	// Go listeners are MPTCP sockets where the kernel has MPTCP (Go 1.24
	// and later); they take plain TCP connects too.
	if proto != unix.IPPROTO_TCP && proto != unix.IPPROTO_MPTCP {
		return fmt.Errorf("%w: SO_PROTOCOL %d, not TCP or MPTCP", ErrNotListener, proto)
	}
	acc, err := get(unix.SO_ACCEPTCONN)
	if err != nil {
		return fmt.Errorf("%w: SO_ACCEPTCONN: %v", ErrNotListener, err)
	}
	if acc != 1 {
		return fmt.Errorf("%w: not in LISTEN (SO_ACCEPTCONN 0)", ErrNotListener)
	}
	return nil
}

// NetnsCookieOf returns the cookie of the network namespace the socket fd
// belongs to (SO_NETNS_COOKIE, Linux >= 5.14): the same number the BPF
// programs get from bpf_get_netns_cookie, unique per namespace until reboot.
func NetnsCookieOf(fd int) (uint64, error) {
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("SO_NETNS_COOKIE: %w", err)
	}
	return c, nil
}

// NetnsCookieOfConn is NetnsCookieOf for a *net.TCPListener, *os.File or
// other syscall.Conn.
func NetnsCookieOfConn(c syscall.Conn) (uint64, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cookie uint64
	var cerr error
	if err := rc.Control(func(fd uintptr) { cookie, cerr = NetnsCookieOf(int(fd)) }); err != nil {
		return 0, err
	}
	return cookie, cerr
}

const netnsKeyPrefix = "netns/"

// ForgetAll drops every listener the holder keeps for every namespace (for
// nodeagent uninstall) and returns how many it dropped.
func (s *ListenerStore) ForgetAll() (int, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	return s.Client.DeletePrefix(ctx, netnsKeyPrefix)
}

// Key is the key of a pod's listener: "netns/<cookie>/<name>", cookie in
// decimal. Keys of one namespace share NetnsPrefix(cookie).
func Key(netnsCookie uint64, name string) string {
	return NetnsPrefix(netnsCookie) + name
}

// NetnsPrefix is the prefix of every key of the namespace with cookie.
func NetnsPrefix(netnsCookie uint64) string {
	return netnsKeyPrefix + strconv.FormatUint(netnsCookie, 10) + "/"
}

// ParseKey splits a key made by Key. The name may contain "/"; it may not
// be empty.
func ParseKey(key string) (netnsCookie uint64, name string, err error) {
	rest, ok := strings.CutPrefix(key, netnsKeyPrefix)
	if !ok {
		return 0, "", fmt.Errorf("key %q: no %q prefix", key, netnsKeyPrefix)
	}
	num, name, ok := strings.Cut(rest, "/")
	if !ok || name == "" {
		return 0, "", fmt.Errorf("key %q: want netns/<cookie>/<name>", key)
	}
	if num == "" || (len(num) > 1 && num[0] == '0') {
		return 0, "", fmt.Errorf("key %q: cookie %q is not canonical decimal", key, num)
	}
	c, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, "", fmt.Errorf("key %q: cookie: %w", key, err)
	}
	return c, name, nil
}

// ListenerStore keeps pods' listeners in a holder, keyed by network
// namespace cookie and name (Key). It has the method set of the agent's
// ztunnel.ListenerStore.
type ListenerStore struct {
	Client *Client
	// Timeout bounds each call (the Client's timeout when zero).
	Timeout time.Duration
}

func (s *ListenerStore) ctx() (context.Context, context.CancelFunc) {
	if s.Timeout > 0 {
		return context.WithTimeout(context.Background(), s.Timeout)
	}
	return context.WithCancel(context.Background())
}

// Take returns a listener on the socket held under name for the namespace
// with cookie, or nil and no error if none is held. The holder keeps its
// copy. A held fd that is not a listening TCP socket of that namespace is
// an error.
func (s *ListenerStore) Take(cookie uint64, name string) (*net.TCPListener, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	key := Key(cookie, name)
	f, err := s.Client.Get(ctx, key)
	if errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	got, err := NetnsCookieOfConn(f)
	if err != nil {
		return nil, fmt.Errorf("held %s: %w", key, err)
	}
	if got != cookie {
		return nil, fmt.Errorf("held %s belongs to netns %d", key, got)
	}
	ln, err := ListenerFromFD(f)
	if err != nil {
		return nil, fmt.Errorf("held %s: %w", key, err)
	}
	return ln, nil
}

// Keep hands the holder a copy of ln under name for the namespace with
// cookie, after checking that ln belongs to that namespace.
func (s *ListenerStore) Keep(cookie uint64, name string, ln *net.TCPListener) error {
	got, err := NetnsCookieOfConn(ln)
	if err != nil {
		return fmt.Errorf("keep %s: %w", Key(cookie, name), err)
	}
	if got != cookie {
		return fmt.Errorf("keep %s: listener belongs to netns %d", Key(cookie, name), got)
	}
	ctx, cancel := s.ctx()
	defer cancel()
	return s.Client.Put(ctx, Key(cookie, name), ln)
}

// Forget drops every listener held for the namespace with cookie.
func (s *ListenerStore) Forget(cookie uint64) error {
	ctx, cancel := s.ctx()
	defer cancel()
	_, err := s.Client.DeletePrefix(ctx, NetnsPrefix(cookie))
	return err
}

// Cookies lists the namespaces the holder keeps listeners for, each once,
// in key order. Keys not made by Key are skipped.
func (s *ListenerStore) Cookies() ([]uint64, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	keys, err := s.Client.ListPrefix(ctx, netnsKeyPrefix)
	if err != nil {
		return nil, err
	}
	var out []uint64
	seen := make(map[uint64]bool)
	for _, k := range keys {
		c, _, err := ParseKey(k)
		if err != nil || seen[c] {
			continue
		}
		seen[c] = true
		out = append(out, c)
	}
	return out, nil
}
