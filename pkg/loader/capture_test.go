package loader

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// outboundPod is an enrolled netns with the agent's outbound listeners.
type outboundPod struct {
	ns     *testNS
	cookie NetnsCookie
	in4    <-chan accepted
	in6    <-chan accepted
}

func (e *env) outboundPod(short string) *outboundPod {
	e.t.Helper()
	p := &outboundPod{ns: e.newNS(short)}
	p.in4 = acceptor(e.t, p.ns.listen(e.t, "tcp4", "127.0.0.1:15001"))
	p.in6 = acceptor(e.t, p.ns.listen(e.t, "tcp6", "[::1]:15001"))
	c, err := e.l.Enroll(p.ns.path, EnrollOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	p.cookie = c
	return p
}

// expectCaptured dials dst from the pod and checks that the agent's
// listener gets the connection and recovers dst exactly.
func (e *env) expectCaptured(p *outboundPod, dst netip.AddrPort, o dialOpts) {
	t := e.t
	t.Helper()
	c, local, err := p.ns.dial(dst, o)
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer c.Close()
	in := p.in6
	want := netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if want.Addr().Is4() {
		in = p.in4
	}
	ac := next(t, in, local)
	got, err := e.l.OriginalDst(ac)
	if err != nil {
		t.Fatalf("original dst of %s: %v", dst, err)
	}
	if got != want {
		t.Fatalf("original dst = %s, want %s", got, want)
	}
}

func TestOutboundCapture(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")
	for _, tt := range []struct {
		name string
		dst  string
	}{
		{"ipv4", "198.18.0.10:80"},
		{"ipv6", "[2001:2::10]:443"},
		{"ipv4-mapped ipv6", "[::ffff:198.18.0.11]:8080"},
		{"ipv4 high port", "198.19.255.254:65535"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e.expectCaptured(p, netip.MustParseAddrPort(tt.dst), dialOpts{})
		})
	}
	s, err := e.l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if s.Captured < 4 || s.OrigAdded < 4 || s.Errors() != 0 {
		t.Fatalf("stats %+v: want >= 4 captured and recorded, no errors", s)
	}
}

func TestOutboundConcurrent(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")
	const n = 1000
	dst := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(1 + i/250), byte(1 + i%250)}), uint16(10000+i))
	}
	fds := make([]int, n)
	for i := range fds {
		fd, err := p.ns.socket(dst(i), 0)
		if err != nil {
			t.Fatal(err)
		}
		fds[i] = fd
		t.Cleanup(func() { unix.Close(fd) })
	}
	locals := make([]netip.AddrPort, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			if err := unix.Connect(fds[i], sockaddr(dst(i))); err != nil {
				errs <- fmt.Errorf("connect %d: %w", i, err)
				return
			}
			locals[i] = sockname(fds[i])
		})
	}
	byLocal := make(map[netip.AddrPort]netip.AddrPort, n)
	got := 0
	for got < n {
		a := <-p.in4
		d, err := e.l.OriginalDst(a.conn)
		if err != nil {
			t.Fatalf("connection %d: %v", got, err)
		}
		byLocal[a.remote] = d
		got++
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i := range n {
		if byLocal[locals[i]] != dst(i) {
			t.Fatalf("client %d (%s): original dst %s, want %s", i, locals[i], byLocal[locals[i]], dst(i))
		}
	}
}

func TestOutboundSameLoopbackTupleTwoPods(t *testing.T) {
	e := newEnv(t, Config{})
	a, b := e.outboundPod("a"), e.outboundPod("b")
	if a.cookie == b.cookie {
		t.Fatal("two namespaces with one cookie")
	}
	bind := netip.MustParseAddrPort("127.0.0.1:40000")
	dstA, dstB := netip.MustParseAddrPort("198.18.0.1:80"), netip.MustParseAddrPort("198.18.0.2:80")
	ca, la, err := a.ns.dial(dstA, dialOpts{bind: bind})
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	cb, lb, err := b.ns.dial(dstB, dialOpts{bind: bind})
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Close()
	acA, acB := next(t, a.in4, la), next(t, b.in4, lb)
	if acA.LocalAddr().String() != acB.LocalAddr().String() || acA.RemoteAddr().String() != acB.RemoteAddr().String() {
		t.Fatalf("tuples differ: %s-%s vs %s-%s", acA.RemoteAddr(), acA.LocalAddr(), acB.RemoteAddr(), acB.LocalAddr())
	}
	for _, c := range []struct {
		ac   interface{ Close() error }
		name string
		got  func() (netip.AddrPort, error)
		want netip.AddrPort
	}{
		{acA, "a", func() (netip.AddrPort, error) { return e.l.OriginalDst(acA) }, dstA},
		{acB, "b", func() (netip.AddrPort, error) { return e.l.OriginalDst(acB) }, dstB},
	} {
		got, err := c.got()
		if err != nil || got != c.want {
			t.Fatalf("pod %s: original dst %s, %v; want %s", c.name, got, err, c.want)
		}
	}
}

func TestOutboundNotCaptured(t *testing.T) {
	e := newEnv(t, Config{
		ExcludePorts: []uint16{9999},
		ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.128.0/17"), netip.MustParsePrefix("2001:2:0:ff::/64")},
	})
	p := e.outboundPod("pod")
	other := e.newNS("other")
	local := p.ns.listen(t, "tcp4", "127.0.0.1:8080")
	localIn := acceptor(t, local)

	for _, tt := range []struct {
		name string
		ns   *testNS
		dst  string
		mark int
	}{
		{"not enrolled", other, "198.18.0.10:80", 0},
		{"agent mark", p.ns, "198.18.0.10:80", Mark},
		{"excluded port", p.ns, "198.18.0.10:9999", 0},
		{"excluded cidr v4", p.ns, "198.18.200.1:80", 0},
		{"excluded cidr v4-mapped", p.ns, "[::ffff:198.18.200.1]:80", 0},
		{"excluded cidr v6", p.ns, "[2001:2:0:ff::1]:80", 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// Uncaptured, the connect meets the namespace's real routing
			// table: only loopback, so the network is unreachable.
			c, _, err := tt.ns.dial(netip.MustParseAddrPort(tt.dst), dialOpts{mark: tt.mark})
			if err == nil {
				c.Close()
				t.Fatal("connect succeeded: it was captured")
			}
			if !isUnreachable(err) {
				t.Fatalf("connect: %v, want ENETUNREACH", err)
			}
			none(t, p.in4, tt.name)
			none(t, p.in6, tt.name)
		})
	}
	t.Run("loopback", func(t *testing.T) {
		c, la, err := p.ns.dial(netip.MustParseAddrPort("127.0.0.1:8080"), dialOpts{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ac := next(t, localIn, la)
		if _, err := e.l.OriginalDst(ac); !errors.Is(err, ErrNotCaptured) {
			t.Fatalf("original dst of a loopback connection: %v, want ErrNotCaptured", err)
		}
	})
	t.Run("host", func(t *testing.T) {
		// The test process itself (host netns, inside the attach cgroup):
		// its connect is neither rewritten nor even counted.
		hl, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer hl.Close()
		before, _ := e.l.Stats()
		c, err := net.Dial("tcp4", hl.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if after, _ := e.l.Stats(); after != before {
			t.Fatalf("host connect changed the counters: %+v -> %+v", before, after)
		}
	})
	s, err := e.l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if s.Captured != 0 || s.PassedMark != 1 || s.PassedPort != 1 || s.PassedCIDR != 3 || s.PassedLocal != 1 {
		t.Fatalf("stats %+v", s)
	}
}
