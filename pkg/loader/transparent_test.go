package loader

import (
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// routeMarkedLocal installs in n what pkg/transparent does (it imports this
// package, so the test repeats it): TransparentMark → a table whose default
// is local, and tcp_fwmark_accept.
func routeMarkedLocal(t *testing.T, n *testNS) {
	t.Helper()
	h, err := netlink.NewHandleAt(n.h)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		bits := 32
		if fam == unix.AF_INET6 {
			bits = 128
		}
		dst := &net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)}
		if err := h.RouteAdd(&netlink.Route{LinkIndex: 1, Dst: dst, Table: 1338, Type: unix.RTN_LOCAL, Scope: unix.RT_SCOPE_HOST, Family: fam}); err != nil {
			t.Fatalf("add local route: %v", err)
		}
		r := netlink.NewRule()
		r.Family, r.Priority, r.Mark, r.Table = fam, 1338, TransparentMark, 1338
		if err := h.RuleAdd(r); err != nil {
			t.Fatalf("add rule: %v", err)
		}
	}
	if err := n.do(func() error {
		return os.WriteFile("/proc/sys/net/ipv4/tcp_fwmark_accept", []byte("1"), 0o644)
	}); err != nil {
		t.Fatal(err)
	}
}

// transparentDial connects from src (any address) to dst inside n, as the
// agent does for source preservation.
func (n *testNS) transparentDial(src netip.Addr, dst netip.AddrPort, mark int) (net.Conn, error) {
	fd, err := n.socket(dst, mark)
	if err != nil {
		return nil, err
	}
	lvl, opt := unix.SOL_IP, unix.IP_TRANSPARENT
	if !dst.Addr().Is4() {
		lvl, opt = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
	}
	if err := unix.SetsockoptInt(fd, lvl, opt, 1); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// A blocking connect gives up after SO_SNDTIMEO.
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Usec: 300000}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, sockaddr(netip.AddrPortFrom(src, 0))); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Connect(fd, sockaddr(dst)); err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "transparent")
	defer f.Close()
	return net.FileConn(f)
}

// TestTransparentConnectPassesSkLookup: the agent's transparent connect to an
// app from a client's address reaches the app (sk_lookup lets the recorded
// SYN through), not the inbound listener; the app sees the client's address;
// wr_tpass is empty again once the connection is established; a connect from
// a foreign address without the mark is steered as before.
func TestTransparentConnectPassesSkLookup(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")
	peer := e.newNS("peer")
	e.veth(p.ns, peer, []string{"198.18.1.2/24", "2001:2:0:1::2/64"}, []string{"198.18.1.1/24", "2001:2:0:1::1/64"})
	routeMarkedLocal(t, p.ns)
	app := acceptor(t, p.ns.listen(t, "tcp", ":8080"))
	inLn := p.ns.listen(t, "tcp", ":15006")
	in := acceptor(t, inLn)
	if _, err := e.l.Enroll(p.ns.path, EnrollOptions{Inbound: inLn}); err != nil {
		t.Fatal(err)
	}
	before, err := e.l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		src  string
		dst  string
	}{
		{"ipv4", "198.18.7.7", "198.18.1.2:8080"},
		{"ipv6", "2001:2:0:7::7", "[2001:2:0:1::2]:8080"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			src, dst := netip.MustParseAddr(tt.src), netip.MustParseAddrPort(tt.dst)
			c, err := p.ns.transparentDial(src, dst, TransparentMark)
			if err != nil {
				t.Fatalf("transparent dial: %v", err)
			}
			defer c.Close()
			client := unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort())
			if client.Addr() != src {
				t.Fatalf("agent socket bound to %s, want %s", client, src)
			}
			ac := next(t, app, client)
			if got := localAP(ac); got != dst {
				t.Fatalf("app's local address %s, want %s", got, dst)
			}
			none(t, in, "inbound listener")
			// Bytes both ways: the app's replies come back to the agent's socket.
			if _, err := ac.Write([]byte("pong")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4)
			if _, err := c.Read(buf); err != nil || string(buf) != "pong" {
				t.Fatalf("read %q, %v", buf, err)
			}
		})
	}
	t.Run("unmarked foreign source is steered", func(t *testing.T) {
		// Same shape without the transparent mark: the agent's normal
		// mark, so capture passes it, but sk_lookup must steer it.
		s0, err := e.l.Stats()
		if err != nil {
			t.Fatal(err)
		}
		c, err := p.ns.transparentDial(netip.MustParseAddr("198.18.7.8"), netip.MustParseAddrPort("198.18.1.2:8080"), Mark)
		if err == nil {
			c.Close()
		}
		none(t, app, "app")
		s1, err := e.l.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if s1.InboundCaptured == s0.InboundCaptured {
			t.Errorf("SYN from a foreign source without the transparent mark was not steered")
		}
	})
	after, err := e.l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if d := after.TransparentAdded - before.TransparentAdded; d != 2 {
		t.Errorf("transparent_added +%d, want 2", d)
	}
	if d := after.InboundPassedTransp - before.InboundPassedTransp; d != 2 {
		t.Errorf("inbound_passed_transparent +%d, want 2", d)
	}
	var (
		k wrTpKey
		v uint8
	)
	if it := e.l.tpass.Iterate(); it.Next(&k, &v) {
		t.Errorf("wr_tpass keeps %+v after ESTABLISHED", k)
	}
}
