package loader

import (
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// rawName returns getpeername (peer) or getsockname of c as the kernel
// answers it, in the socket's own family (an IPv4-mapped address stays so).
func rawName(t testing.TB, c net.Conn, peer bool) netip.AddrPort {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var (
		sa   unix.Sockaddr
		serr error
	)
	if err := rc.Control(func(fd uintptr) {
		if peer {
			sa, serr = unix.Getpeername(int(fd))
		} else {
			sa, serr = unix.Getsockname(int(fd))
		}
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatalf("get name: %v", serr)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	t.Fatalf("sockaddr %T", sa)
	return netip.AddrPort{}
}

func TestGetpeernameGetsockname(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")
	podIPs := []netip.Addr{netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("2001:2::2")}
	if _, err := e.l.Enroll(p.ns.path, EnrollOptions{PodIPs: podIPs}); err != nil {
		t.Fatal(err)
	}
	v4only := e.outboundPod("v4only")
	if _, err := e.l.Enroll(v4only.ns.path, EnrollOptions{PodIPs: podIPs[:1]}); err != nil {
		t.Fatal(err)
	}
	before, err := e.l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name     string
		pod      *outboundPod
		dst      string
		wantPeer string
		wantSock string // address only: the port is the socket's own
	}{
		{"ipv4", p, "198.18.0.10:80", "198.18.0.10:80", "198.18.0.2"},
		{"ipv6", p, "[2001:2::10]:443", "[2001:2::10]:443", "2001:2::2"},
		{"ipv4-mapped on an IPv6 socket", p, "[::ffff:198.18.0.11]:8080", "[::ffff:198.18.0.11]:8080", "::ffff:198.18.0.2"},
		{"ipv6, pod without an IPv6 address", v4only, "[2001:2::10]:443", "[2001:2::10]:443", "::1"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dst := netip.MustParseAddrPort(tt.dst)
			c, _, err := tt.pod.ns.dial(dst, dialOpts{})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if got := rawName(t, c, true); got != netip.MustParseAddrPort(tt.wantPeer) {
				t.Errorf("getpeername = %s, want %s", got, tt.wantPeer)
			}
			got := rawName(t, c, false)
			if got.Addr() != netip.MustParseAddr(tt.wantSock) || got.Port() == 0 {
				t.Errorf("getsockname = %s, want %s and a port", got, tt.wantSock)
			}
			// Go's view, as an app sees it.
			if ra := c.RemoteAddr().(*net.TCPAddr).AddrPort(); unmapAP(ra) != unmapAP(dst) {
				t.Errorf("RemoteAddr = %s, want %s", ra, dst)
			}
		})
	}
	t.Run("agent side and uncaptured sockets keep the kernel's answer", func(t *testing.T) {
		c, local, err := p.ns.dial(netip.MustParseAddrPort("198.18.0.10:80"), dialOpts{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// local is the pod's address already; the agent sees the loopback one.
		client := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), local.Port())
		ac := next(t, p.in4, client)
		if got := rawName(t, ac, true); got != client {
			t.Errorf("agent's getpeername = %s, want %s", got, client)
		}
		if got := rawName(t, ac, false); got != netip.MustParseAddrPort("127.0.0.1:15001") {
			t.Errorf("agent's getsockname = %s, want 127.0.0.1:15001", got)
		}
		// A connect to loopback is not captured: the listener itself answers.
		d, _, err := p.ns.dial(netip.MustParseAddrPort("127.0.0.1:15001"), dialOpts{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if got := rawName(t, d, true); got != netip.MustParseAddrPort("127.0.0.1:15001") {
			t.Errorf("uncaptured getpeername = %s, want 127.0.0.1:15001", got)
		}
		if got := rawName(t, d, false); !got.Addr().IsLoopback() {
			t.Errorf("uncaptured getsockname = %s, want loopback", got)
		}
	})
	after, err := e.l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if d := after.PeerOriginal - before.PeerOriginal; d < 4 {
		t.Errorf("peer_original +%d, want >= 4", d)
	}
	if d := after.SockPod - before.SockPod; d < 3 {
		t.Errorf("sock_pod +%d, want >= 3", d)
	}
	if d := after.SockNoPodAddr - before.SockNoPodAddr; d < 1 {
		t.Errorf("sock_no_pod_addr +%d, want >= 1", d)
	}
}
