package loader

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// veth joins a and b with a veth pair and gives each end its addresses
// (CIDR strings from 198.18.0.0/15 and 2001:2::/48).
func (e *env) veth(a, b *testNS, addrsA, addrsB []string) {
	t := e.t
	t.Helper()
	ha, err := netlink.NewHandleAt(a.h)
	if err != nil {
		t.Fatal(err)
	}
	defer ha.Close()
	hb, err := netlink.NewHandleAt(b.h)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	if err := ha.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "wra"}, PeerName: "wrb", PeerNamespace: netlink.NsFd(b.h)}); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	for _, side := range []struct {
		h     *netlink.Handle
		name  string
		addrs []string
	}{{ha, "wra", addrsA}, {hb, "wrb", addrsB}} {
		lk, err := side.h.LinkByName(side.name)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range side.addrs {
			ad, err := netlink.ParseAddr(s)
			if err != nil {
				t.Fatal(err)
			}
			ad.Flags = unix.IFA_F_NODAD
			if err := side.h.AddrAdd(lk, ad); err != nil {
				t.Fatalf("add %s: %v", s, err)
			}
		}
		if err := side.h.LinkSetUp(lk); err != nil {
			t.Fatal(err)
		}
	}
}

func localAP(c *net.TCPConn) netip.AddrPort {
	return unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort())
}

func TestInbound(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")
	client := e.newNS("client")
	e.veth(p.ns, client, []string{"198.18.1.2/24", "2001:2:0:1::2/64"}, []string{"198.18.1.1/24", "2001:2:0:1::1/64"})

	app := acceptor(t, p.ns.listen(t, "tcp", ":8080"))
	hbone := acceptor(t, p.ns.listen(t, "tcp", ":15008"))
	inLn := p.ns.listen(t, "tcp", ":15006")
	in := acceptor(t, inLn)
	if _, err := e.l.Enroll(p.ns.path, EnrollOptions{Inbound: inLn}); err != nil {
		t.Fatal(err)
	}

	podIP4, podIP6 := netip.MustParseAddr("198.18.1.2"), netip.MustParseAddr("2001:2:0:1::2")
	for _, tt := range []struct {
		name   string
		from   *testNS
		dst    netip.AddrPort
		mark   int
		wantOn string // "in", "app", "hbone", "out"
	}{
		{"client to app v4", client, netip.AddrPortFrom(podIP4, 8080), 0, "in"},
		{"client to app v6", client, netip.AddrPortFrom(podIP6, 8080), 0, "in"},
		{"client to closed port", client, netip.AddrPortFrom(podIP4, 9090), 0, "in"},
		{"client to hbone", client, netip.AddrPortFrom(podIP4, 15008), 0, "hbone"},
		{"client to hbone v6", client, netip.AddrPortFrom(podIP6, 15008), 0, "hbone"},
		{"agent to app via pod ip", p.ns, netip.AddrPortFrom(podIP4, 8080), Mark, "app"},
		{"agent to app via pod ip v6", p.ns, netip.AddrPortFrom(podIP6, 8080), Mark, "app"},
		{"agent to app via loopback", p.ns, netip.MustParseAddrPort("127.0.0.1:8080"), Mark, "app"},
		{"app to own pod ip (outbound capture)", p.ns, netip.AddrPortFrom(podIP4, 8080), 0, "out"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, local, err := tt.from.dial(tt.dst, dialOpts{mark: tt.mark})
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			var ch <-chan accepted
			switch tt.wantOn {
			case "in":
				ch = in
			case "app":
				ch = app
			case "hbone":
				ch = hbone
			case "out":
				ch = p.in4
			}
			ac := next(t, ch, local)
			switch tt.wantOn {
			case "in", "app", "hbone":
				if got := localAP(ac); got != tt.dst {
					t.Fatalf("accepted local address %s, want the original destination %s", got, tt.dst)
				}
			case "out":
				if got, err := e.l.OriginalDst(ac); err != nil || got != tt.dst {
					t.Fatalf("original dst %s, %v; want %s", got, err, tt.dst)
				}
			}
			for name, other := range map[string]<-chan accepted{"in": in, "app": app, "hbone": hbone} {
				if name != tt.wantOn {
					none(t, other, name)
				}
			}
		})
	}

	// Exempt the client's IPv4 address (as the node's, for kubelet probes).
	if _, err := e.l.Enroll(p.ns.path, EnrollOptions{Inbound: inLn, ExemptSources: []netip.Addr{netip.MustParseAddr("198.18.1.1")}}); err != nil {
		t.Fatal(err)
	}
	c, local, err := client.dial(netip.AddrPortFrom(podIP4, 8080), dialOpts{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	next(t, app, local)
	none(t, in, "exempt source")
	c6, local6, err := client.dial(netip.AddrPortFrom(podIP6, 8080), dialOpts{})
	if err != nil {
		t.Fatal(err)
	}
	defer c6.Close()
	next(t, in, local6)

	s, err := e.l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if s.InboundCaptured != 4 || s.InboundPassedHBONE != 2 || s.InboundPassedLocal != 4 || s.InboundPassedExempt != 1 || s.Errors() != 0 {
		t.Fatalf("stats %+v", s)
	}
}
