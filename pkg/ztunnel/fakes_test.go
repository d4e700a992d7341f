package ztunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/internal/testpki"
	"github.com/warren-mesh/warren/pkg/balance"
	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/loader"
)

// The fakes below stand in for the proxy's dependencies so that every path
// runs without root: network namespaces become loopback addresses, capture
// a table of original destinations, the identity manager a test CA.

// fakeNet is the network of the fake namespaces. Every socket is a real
// loopback socket; routes map the addresses the proxy dials (pod IPs and
// the ports it believes it listens on, app ports, outside destinations) to
// the loopback addresses that actually serve them.
type fakeNet struct {
	mu     sync.Mutex
	routes map[netip.AddrPort]hop
	ips    map[string]netip.Addr // netns path -> the pod's (loopback) IPv4
	nss    map[string][]*fakeNS  // every namespace opened, by path
	// openErr fails Open of a path while it returns an error.
	openErr func(path string) error
	opened  map[string]int
}

// hop is where a dialed address leads.
type hop struct {
	real      netip.AddrPort
	blackhole bool // the connect never completes: it waits for its context
}

func newFakeNet() *fakeNet {
	return &fakeNet{routes: map[netip.AddrPort]hop{}, ips: map[string]netip.Addr{}, nss: map[string][]*fakeNS{}, opened: map[string]int{}}
}

// route makes dials to virt reach real.
func (n *fakeNet) route(virt, real netip.AddrPort) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.routes[virt] = hop{real: real}
}

// blackhole makes dials to virt hang until their context ends.
func (n *fakeNet) blackhole(virt netip.AddrPort) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.routes[virt] = hop{blackhole: true}
}

// Open implements Namespaces.
func (n *fakeNet) Open(path string) (Netns, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.opened[path]++
	if n.openErr != nil {
		if err := n.openErr(path); err != nil {
			return nil, err
		}
	}
	ip, ok := n.ips[path]
	if !ok {
		return nil, fmt.Errorf("no such namespace %s", path)
	}
	ns := &fakeNS{net: n, path: path, ip: ip, listeners: map[netip.AddrPort]*net.TCPListener{}}
	n.nss[path] = append(n.nss[path], ns)
	return ns, nil
}

// openCount returns how many times path was opened.
func (n *fakeNet) openCount(path string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.opened[path]
}

// current returns the namespace last opened at path.
func (n *fakeNet) current(path string) *fakeNS {
	n.mu.Lock()
	defer n.mu.Unlock()
	l := n.nss[path]
	if len(l) == 0 {
		return nil
	}
	return l[len(l)-1]
}

// fakeNS is one pod's namespace: its listeners bind the pod's loopback IP.
type fakeNS struct {
	net  *fakeNet
	path string
	ip   netip.Addr

	mu        sync.Mutex
	closed    bool
	listeners map[netip.AddrPort]*net.TCPListener // by the address asked for
}

// Listen binds the pod's IP on a free port. A wildcard listener (15006,
// 15008) is also routed from <pod IP>:<port>, as the pod's address would
// reach it; loopback listeners (15001) are reached through addr only.
func (ns *fakeNS) Listen(addr netip.AddrPort) (*net.TCPListener, error) {
	ln, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(netip.AddrPortFrom(ns.ip, 0)))
	if err != nil {
		return nil, err
	}
	ns.mu.Lock()
	ns.listeners[addr] = ln
	ns.mu.Unlock()
	if addr.Addr().IsUnspecified() {
		ns.net.route(netip.AddrPortFrom(ns.ip, addr.Port()), ln.Addr().(*net.TCPAddr).AddrPort())
	}
	return ln, nil
}

// listener returns the real address of the listener opened for addr.
func (ns *fakeNS) listener(t testing.TB, addr netip.AddrPort) netip.AddrPort {
	t.Helper()
	ns.mu.Lock()
	defer ns.mu.Unlock()
	ln, ok := ns.listeners[addr]
	if !ok {
		t.Fatalf("%s: no listener for %s", ns.path, addr)
	}
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// Dial follows the fake network's routes; an address without a route
// refuses the connection.
func (ns *fakeNS) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	ns.mu.Lock()
	closed := ns.closed
	ns.mu.Unlock()
	if closed {
		return nil, errPodGone
	}
	ns.net.mu.Lock()
	r, ok := ns.net.routes[dst]
	ns.net.mu.Unlock()
	switch {
	case !ok:
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: syscall.ECONNREFUSED}
	case r.blackhole:
		<-ctx.Done()
		return nil, ctx.Err()
	}
	d := net.Dialer{}
	if src.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	c, err := d.DialContext(ctx, "tcp4", r.real.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// EnableRequestMigration implements Netns.
func (ns *fakeNS) EnableRequestMigration() error { return nil }

// Close implements Netns.
func (ns *fakeNS) Close() error {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	ns.closed = true
	return nil
}

func (ns *fakeNS) isClosed() bool {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	return ns.closed
}

// fakeCapture records enrollment and answers original destinations from a
// table the test fills per client connection.
type fakeCapture struct {
	mu        sync.Mutex
	next      loader.NetnsCookie
	enrolled  map[loader.NetnsCookie]string // cookie -> netns path
	opts      map[string]loader.EnrollOptions
	unenrolls []loader.NetnsCookie
	orig      map[netip.AddrPort]*origEntry // by the client's address
	enrollErr error
	// stale are cookies Enrolled reports beside the enrolled ones.
	stale     []loader.NetnsCookie
	listErr   error
	hbonePort uint16 // HBONEPort's answer when non-zero (see withPort)
}

type origEntry struct {
	done chan struct{}
	dst  netip.AddrPort
	err  error
}

func newFakeCapture() *fakeCapture {
	return &fakeCapture{next: 1000, enrolled: map[loader.NetnsCookie]string{}, opts: map[string]loader.EnrollOptions{}, orig: map[netip.AddrPort]*origEntry{}}
}

func (c *fakeCapture) Enroll(path string, opts loader.EnrollOptions) (loader.NetnsCookie, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.enrollErr != nil {
		return 0, c.enrollErr
	}
	c.next++
	c.enrolled[c.next] = path
	c.opts[path] = opts
	return c.next, nil
}

func (c *fakeCapture) Unenroll(cookie loader.NetnsCookie) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.unenrolls = append(c.unenrolls, cookie)
	delete(c.enrolled, cookie)
	return nil
}

func (c *fakeCapture) entry(client netip.AddrPort) *origEntry {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.orig[client]
	if !ok {
		e = &origEntry{done: make(chan struct{})}
		c.orig[client] = e
	}
	return e
}

// setOrig tells OriginalDst what the connection from client asked for.
func (c *fakeCapture) setOrig(client, dst netip.AddrPort, err error) {
	e := c.entry(client)
	e.dst, e.err = dst, err
	close(e.done)
}

// OriginalDst waits for the test to say what the client asked for: the
// handler may ask before the test has learned the client's port.
func (c *fakeCapture) OriginalDst(conn *net.TCPConn) (netip.AddrPort, error) {
	e := c.entry(unmap(conn.RemoteAddr().(*net.TCPAddr).AddrPort()))
	select {
	case <-e.done:
		return e.dst, e.err
	case <-time.After(10 * time.Second):
		return netip.AddrPort{}, errors.New("fake capture: no original destination was set")
	}
}

func (c *fakeCapture) cookieOf(path string) (loader.NetnsCookie, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, v := range c.enrolled {
		if v == path {
			return k, true
		}
	}
	return 0, false
}

func (c *fakeCapture) unenrolled() []loader.NetnsCookie {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]loader.NetnsCookie(nil), c.unenrolls...)
}

// listingCapture adds Enrolled, which Reconcile uses.
type listingCapture struct{ *fakeCapture }

func (c listingCapture) Enrolled() ([]loader.NetnsCookie, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.listErr != nil {
		return nil, c.listErr
	}
	out := append([]loader.NetnsCookie(nil), c.stale...)
	for k := range c.enrolled {
		out = append(out, k)
	}
	return out, nil
}

// portCapture adds HBONEPort, as a *loader.Loader has it.
type portCapture struct{ *fakeCapture }

func (c portCapture) HBONEPort() uint16 { return c.hbonePort }

// fakeCerts is the identity manager: SVIDs from a test CA, held counts, and
// failures on demand.
type fakeCerts struct {
	ca *testpki.CA

	mu       sync.Mutex
	svids    map[spiffeid.ID]*testpki.SVID
	present  map[spiffeid.ID]*testpki.SVID // a server presenting another identity
	held     map[identity.Identity]int
	acquires int
	releases int
	// acquire replaces Acquire's answer when set (it may wait for ctx).
	acquire func(ctx context.Context, id identity.Identity) error
}

func newFakeCerts(t testing.TB, ca *testpki.CA, ids ...spiffeid.ID) *fakeCerts {
	f := &fakeCerts{ca: ca, svids: map[spiffeid.ID]*testpki.SVID{}, present: map[spiffeid.ID]*testpki.SVID{}, held: map[identity.Identity]int{}}
	for _, id := range ids {
		f.svids[id] = ca.Issue(t, id)
	}
	return f
}

func (f *fakeCerts) Acquire(ctx context.Context, id identity.Identity) error {
	f.mu.Lock()
	f.acquires++
	f.held[id]++
	acquire := f.acquire
	f.mu.Unlock()
	if acquire != nil {
		return acquire(ctx, id)
	}
	return nil
}

func (f *fakeCerts) Release(id identity.Identity) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.releases++
	f.held[id]--
}

func (f *fakeCerts) holds(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	i, _ := identity.Parse(id)
	return f.held[i]
}

func (f *fakeCerts) svid(id spiffeid.ID) (*testpki.SVID, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.svids[id]
	if !ok {
		return nil, fmt.Errorf("fake certs: no SVID for %s", id)
	}
	return s, nil
}

// ServerConfig presents the chosen identity's SVID (or the one set in
// present) and requires a client certificate from the test CA.
func (f *fakeCerts) ServerConfig(choose identity.ServerIdentityFunc) (*tls.Config, error) {
	return &tls.Config{
		ClientAuth: tls.RequireAnyClientCert,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			id, err := choose(hello)
			if err != nil {
				return nil, err
			}
			f.mu.Lock()
			s, ok := f.present[id]
			if !ok {
				s, ok = f.svids[id]
			}
			f.mu.Unlock()
			if !ok {
				return nil, fmt.Errorf("fake certs: no SVID for %s", id)
			}
			return tlsconfig.MTLSServerConfig(s.X509, f.ca.Bundle(), tlsconfig.AuthorizeMemberOf(f.ca.TrustDomain())), nil
		},
	}, nil
}

// clientTLS returns the HBONE client side of the same identities.
func (f *fakeCerts) clientTLS() hbone.ClientTLS {
	return hbone.SPIFFEClientTLS{
		SVID: func(src spiffeid.ID) (x509svid.Source, error) {
			s, err := f.svid(src)
			if err != nil {
				return nil, err
			}
			return s.X509, nil
		},
		Bundles: f.ca.Bundle(),
	}
}

// fakeTunnels answers Dial with an error and records the requests.
type fakeTunnels struct {
	mu   sync.Mutex
	reqs []hbone.Request
	err  error
}

func (f *fakeTunnels) Dial(ctx context.Context, req hbone.Request) (*hbone.Stream, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reqs = append(f.reqs, req)
	return nil, f.err
}

// fakeBalancer picks with the real picker, or fails with err, and records
// what it was asked.
type fakeBalancer struct {
	mu    sync.Mutex
	err   error
	calls []netip.AddrPort
	pick  *balance.Picker
}

func (f *fakeBalancer) Pick(src balance.Endpoints, svc *config.Service, vip netip.AddrPort, from *config.Workload) (balance.Choice, error) {
	f.mu.Lock()
	f.calls = append(f.calls, vip)
	err := f.err
	f.mu.Unlock()
	if err != nil {
		return balance.Choice{}, err
	}
	return f.pick.Pick(src, svc, vip, from)
}
