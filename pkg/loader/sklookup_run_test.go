package loader

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// skLookupCtx mirrors struct bpf_sk_lookup (linux/bpf.h) for BPF_PROG_TEST_RUN.
type skLookupCtx struct {
	Cookie         uint64 // out: cookie of the selected socket
	Family         uint32
	Protocol       uint32
	RemoteIP4      [4]byte
	RemoteIP6      [16]byte
	RemotePort     uint16 // network order
	_              uint16
	LocalIP4       [4]byte
	LocalIP6       [16]byte
	LocalPort      uint32 // host order
	IngressIfindex uint32
	_              uint32
}

func lookupCtx(proto uint32, remote, local netip.AddrPort) skLookupCtx {
	c := skLookupCtx{Protocol: proto, LocalPort: uint32(local.Port())}
	c.RemotePort = remote.Port()>>8 | remote.Port()<<8
	if remote.Addr().Is4() {
		c.Family = unix.AF_INET
		c.RemoteIP4, c.LocalIP4 = remote.Addr().As4(), local.Addr().As4()
	} else {
		c.Family = unix.AF_INET6
		c.RemoteIP6, c.LocalIP6 = remote.Addr().As16(), local.Addr().As16()
	}
	return c
}

// TestSkLookupRun drives the sk_lookup program through BPF_PROG_TEST_RUN
// (Linux 5.14) with synthetic lookups: the steering rules without packets.
func TestSkLookupRun(t *testing.T) {
	e := newEnv(t, Config{HBONEPort: 15008})
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const slot, emptySlot = 7, 8
	if err := e.l.setInbound(slot, ln.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	if err := e.l.setExempt(slot, []netip.Addr{netip.MustParseAddr("198.18.9.9")}); err != nil {
		t.Fatal(err)
	}
	rc, _ := ln.(*net.TCPListener).SyscallConn()
	var lnCookie uint64
	rc.Control(func(fd uintptr) { lnCookie, _ = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) })

	pod := netip.MustParseAddrPort("198.18.1.2:8080")
	for _, tt := range []struct {
		name   string
		slot   uint32
		proto  uint32
		remote string
		local  netip.AddrPort
		steer  bool
	}{
		{"outside client", slot, unix.IPPROTO_TCP, "198.18.1.1:50000", pod, true},
		{"hbone port", slot, unix.IPPROTO_TCP, "198.18.1.1:50000", netip.MustParseAddrPort("198.18.1.2:15008"), false},
		{"loopback", slot, unix.IPPROTO_TCP, "127.0.0.1:50000", netip.MustParseAddrPort("127.0.0.1:8080"), false},
		{"pod's own address", slot, unix.IPPROTO_TCP, "198.18.1.2:50000", pod, false},
		{"exempt source", slot, unix.IPPROTO_TCP, "198.18.9.9:50000", pod, false},
		{"udp", slot, unix.IPPROTO_UDP, "198.18.1.1:50000", pod, false},
		{"no listener", emptySlot, unix.IPPROTO_TCP, "198.18.1.1:50000", pod, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			prog, err := e.l.loadSkLookup(tt.slot)
			if err != nil {
				t.Fatal(err)
			}
			defer prog.Close()
			in := lookupCtx(tt.proto, netip.MustParseAddrPort(tt.remote), tt.local)
			var out skLookupCtx
			ret, err := prog.Run(&ebpf.RunOptions{Context: in, ContextOut: &out})
			if err != nil {
				t.Fatalf("test run: %v", err)
			}
			if ret != 1 { // SK_PASS
				t.Fatalf("verdict %d, want SK_PASS", ret)
			}
			if steered := out.Cookie == lnCookie; steered != tt.steer || (!tt.steer && out.Cookie != 0) {
				t.Fatalf("selected socket cookie %d (listener %d), want steered=%v", out.Cookie, lnCookie, tt.steer)
			}
		})
	}
	s, err := e.l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if s.InboundCaptured != 1 || s.InboundPassedHBONE != 1 || s.InboundPassedLocal != 2 || s.InboundPassedExempt != 1 || s.ErrNoInboundListener != 1 {
		t.Fatalf("stats %+v", s)
	}
}
