package ztunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/loader"
)

// openSet opens one connection of each kind the server pod takes part in,
// each relayed and left open: an HBONE tunnel from remote, a plaintext
// connection from outside the mesh, and an outbound connection of the
// server pod to legacy.
type openSet struct {
	tunnel *hbone.Stream
	plain  *net.TCPConn
	out    *net.TCPConn
}

func (b *bed) openAll() openSet {
	b.t.Helper()
	b.echoApp(b.ap(12, 9000), false)
	b.echoApp(b.plainDst(), false)
	b.echoApp(b.ap(13, 5432), false)
	s, err := b.tunnelFromRemote(b.ap(12, 9000), nil)
	if err != nil {
		b.t.Fatal(err)
	}
	echoOnce(b.t, s, "tunnel")
	p := b.dialPlaintext(b.ip(50))
	echoOnce(b.t, p, "plain")
	o := b.dialOutbound("/fake/server", b.ap(13, 5432))
	echoOnce(b.t, o, "out")
	waitFor(b.t, "three connections are tracked", func() bool { return b.openConns() == 3 })
	return openSet{tunnel: s, plain: p, out: o}
}

// Label sets of openAll's connections.
func (b *bed) openAllLabels() (tunnel, plainIn, out string) {
	return lbl("destination", l(srcRemote, dstServer, mtls)...),
		lbl("destination", l(dstServer, plain)...),
		lbl("source", l([]string{"source_workload", "server", "source_workload_namespace", "default"}, dstLegacy, plain)...)
}

// TestPolicyRecheck: a policy change resets the open inbound connections it
// no longer allows, each closing with DENY (ztunnel's late rejection), and
// leaves the others and every outbound connection alone.
func TestPolicyRecheck(t *testing.T) {
	b := newBed(t, bedOpts{})
	conns := b.openAll()
	tunnel, plainIn, out := b.openAllLabels()

	denyRemote := withPolicy("deny-remote", config.ActionDeny, config.Match{Principals: []config.StringMatch{{Kind: config.MatchExact, Value: "cluster.local/ns/prod/sa/remote"}}})
	b.publish(denyRemote)
	wasReset(t, conns.tunnel)
	checkLog(t, b.logs.next(t), map[string]string{"direction": "inbound", "response_flags": "DENY", "error": errRevokedPolicy.Error(),
		"reason": "deny (deny_matched default/deny-remote)", "bytes_received": "6", "bytes_sent": "6"})
	// The plaintext connection has no principal: still allowed, still relayed.
	echoOnce(t, conns.plain, "still")
	echoOnce(t, conns.out, "still")

	b.publish(both(denyRemote, withPolicy("deny-outside", config.ActionDeny, config.Match{SourceIPs: []netip.Prefix{netip.PrefixFrom(b.ip(50), 32)}})))
	wasReset(t, conns.plain)
	checkLog(t, b.logs.next(t), map[string]string{"direction": "inbound_plaintext", "response_flags": "DENY", "error": errRevokedPolicy.Error(),
		"reason": "deny (deny_matched default/deny-outside)", "bytes_received": "10"})
	// Outbound connections are the destination's to re-check.
	echoOnce(t, conns.out, "after")
	exchange(t, conns.out, "bye")
	checkLog(t, b.logs.next(t), map[string]string{"direction": "outbound", "response_flags": absent, "error": absent, "bytes_received": "16"})

	deny := func(set string) string { return strings.Replace(set, "response_flags=-", "response_flags=DENY", 1) }
	b.checkMetrics(map[string]series{
		"connections_opened_total": {tunnel: 1, plainIn: 1, out: 1},
		"connections_closed_total": {deny(tunnel): 1, deny(plainIn): 1, out: 1},
		"connections_failed_total": {deny(tunnel): 1, deny(plainIn): 1},
		"received_bytes_total":     {tunnel: 6, plainIn: 10, out: 16},
		"sent_bytes_total":         {tunnel: 6, plainIn: 10, out: 16},
	})
	b.logs.none(t)
}

// TestWorkloadRemoval: a workload leaving the configuration loses its
// capture, certificate, namespace and listeners, and its open connections
// are reset and accounted without a response flag (ztunnel's drain).
func TestWorkloadRemoval(t *testing.T) {
	b := newBed(t, bedOpts{})
	conns := b.openAll()
	tunnel, plainIn, out := b.openAllLabels()
	cookie := b.cookie("/fake/server")
	plainAddr := b.plainDst()
	ns := b.net.current("/fake/server")

	b.publish(without("server"))
	for _, c := range []net.Conn{conns.tunnel, conns.plain, conns.out} {
		wasReset(t, c)
	}
	got := map[string]map[string]string{}
	for range 3 {
		r := b.logs.next(t)
		got[r["direction"]] = r
	}
	for _, dir := range []string{"inbound", "inbound_plaintext", "outbound"} {
		checkLog(t, got[dir], map[string]string{"response_flags": absent, "error": errRevokedRemoved.Error()})
	}
	waitFor(t, "the workload is removed", func() bool { return b.podOf("server") == nil && b.openConns() == 0 })

	if un := b.capture.unenrolled(); !slices.Equal(un, []loader.NetnsCookie{cookie}) {
		t.Errorf("unenrolled %v, want [%d]", un, cookie)
	}
	if n := b.certs.holds(serverID); n != 0 {
		t.Errorf("server certificate held %d times after removal, want 0", n)
	}
	if n := b.certs.holds(clientID); n != 1 {
		t.Errorf("client certificate held %d times, want 1", n)
	}
	if !ns.isClosed() {
		t.Error("the removed workload's namespace is still open")
	}
	if c, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(plainAddr)); err == nil {
		c.Close()
		t.Error("the removed workload's plaintext listener still accepts")
	}
	if err := b.p.Ready(); err != nil {
		t.Errorf("Ready after removal: %v", err)
	}
	for _, w := range b.p.Workloads() {
		if w.UID == "server" {
			t.Errorf("Workloads still lists the removed workload: %+v", w)
		}
	}
	// Tunnels can no longer leave from its address.
	_, err := b.pool.Dial(context.Background(), hbone.Request{Source: spiffeid.RequireFromString(serverID), Expected: []spiffeid.ID{spiffeid.RequireFromString(clientID)},
		Addr: b.ap(11, 15008), SourceIP: b.ip(12), Authority: b.ap(11, 80)})
	if err == nil || !strings.Contains(err.Error(), "no local pod has "+b.ip(12).String()) {
		t.Errorf("tunnel from a removed pod: %v, want no local pod", err)
	}
	b.checkMetrics(map[string]series{
		"connections_opened_total": {tunnel: 1, plainIn: 1, out: 1},
		"connections_closed_total": {tunnel: 1, plainIn: 1, out: 1},
		"received_bytes_total":     {tunnel: 6, plainIn: 5, out: 3},
		"sent_bytes_total":         {tunnel: 6, plainIn: 5, out: 3},
	})
	b.logs.none(t)
}

// TestWorkloadChange: a change of address re-enrolls the workload; any
// other change updates it in place.
func TestWorkloadChange(t *testing.T) {
	t.Run("new address: re-enrolled", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		old := b.cookie("/fake/server")
		b.net.mu.Lock()
		b.net.ips["/fake/server"] = b.ip(22)
		b.net.mu.Unlock()
		b.publish(func(c *config.Config) { workload(c, "server").WorkloadIPs = []netip.Addr{b.ip(22)} })
		waitFor(t, "the server is enrolled again", func() bool {
			c, ok := b.capture.cookieOf("/fake/server")
			return ok && c != old && b.p.Ready() == nil
		})
		if un := b.capture.unenrolled(); !slices.Equal(un, []loader.NetnsCookie{old}) {
			t.Errorf("unenrolled %v, want [%d]", un, old)
		}
		if n := b.net.openCount("/fake/server"); n != 2 {
			t.Errorf("server namespace opened %d times, want 2", n)
		}
		b.echoApp(b.ap(22, 9000), false)
		exchange(t, b.dialOutbound("/fake/client", b.ap(22, 9000)), "moved")
		checkLog(t, b.logs.nextWhere(t, "outbound"), map[string]string{"dst.workload": "server", "hbone.addr": b.ap(22, 15008).String(), "response_flags": absent})
	})
	t.Run("other change: updated in place", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		cookie := b.cookie("/fake/client")
		b.publish(func(c *config.Config) {
			w := workload(c, "client")
			m := w.Meta()
			m.WorkloadName = "client-v2"
			w.SetMeta(m)
		})
		b.echoApp(b.ap(99, 80), false)
		waitFor(t, "the pod sees the change", func() bool { return b.podOf("client").workload().WorkloadName() == "client-v2" })
		exchange(t, b.dialOutbound("/fake/client", b.ap(99, 80)), "hi")
		checkLog(t, b.logs.next(t), map[string]string{"src.workload": "client-v2"})
		if c, _ := b.capture.cookieOf("/fake/client"); c != cookie || len(b.capture.unenrolled()) != 0 {
			t.Errorf("an in-place change re-enrolled the workload (cookie %d -> %d, unenrolled %v)", cookie, c, b.capture.unenrolled())
		}
		if n := b.net.openCount("/fake/client"); n != 1 {
			t.Errorf("client namespace opened %d times, want 1", n)
		}
	})
}

// TestShutdown: listeners close at once, capture and certificates stay for
// the next agent, open connections drain; at the deadline the rest are
// reset and accounted without a flag.
func TestShutdown(t *testing.T) {
	t.Run("connections drain", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		conns := b.openAll()
		tunnel, plainIn, out := b.openAllLabels()
		outAddr := b.listener("/fake/client", outbound4)
		b.stopRun()
		done := make(chan error, 1)
		go func() { done <- b.p.Shutdown(context.Background()) }()
		waitFor(t, "the listeners are closed", func() bool {
			b.p.mu.Lock()
			defer b.p.mu.Unlock()
			return b.p.closing
		})
		if c, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(outAddr)); err == nil {
			c.Close()
			t.Error("the outbound listener still accepts while draining")
		}
		// Still relayed while draining.
		echoOnce(t, conns.tunnel, "more")
		exchange(t, conns.plain, "bye")
		exchange(t, conns.out, "bye")
		select {
		case err := <-done:
			t.Fatalf("Shutdown returned %v with a connection open", err)
		default:
		}
		exchange(t, conns.tunnel, "bye")
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Shutdown: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Shutdown did not return once the connections ended")
		}
		if un := b.capture.unenrolled(); len(un) != 0 {
			t.Errorf("Shutdown unenrolled %v: capture must stay for the next agent", un)
		}
		if b.certs.holds(serverID) != 1 || b.certs.holds(clientID) != 1 {
			t.Error("Shutdown released certificates")
		}
		for range 3 {
			checkLog(t, b.logs.next(t), map[string]string{"response_flags": absent, "error": absent})
		}
		b.checkMetrics(map[string]series{
			"connections_opened_total": {tunnel: 1, plainIn: 1, out: 1},
			"connections_closed_total": {tunnel: 1, plainIn: 1, out: 1},
			"received_bytes_total":     {tunnel: 13, plainIn: 8, out: 6},
			"sent_bytes_total":         {tunnel: 13, plainIn: 8, out: 6},
		})
		// A draining agent starts nothing.
		w, _ := b.store.Current().WorkloadByUID("server")
		b.p.addWorkload(context.Background(), w)
		if n := b.net.openCount("/fake/server"); n != 1 {
			t.Errorf("a workload was started after Shutdown (namespace opened %d times)", n)
		}
	})
	t.Run("the rest is reset at the deadline", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		conns := b.openAll()
		tunnel, plainIn, out := b.openAllLabels()
		b.stopRun()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- b.p.Shutdown(ctx) }()
		echoOnce(t, conns.out, "draining")
		cancel() // the deadline
		var err error
		select {
		case err = <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Shutdown did not return at its deadline")
		}
		if err == nil || err.Error() != "ztunnel: drain deadline passed with 3 connection(s) open; reset them" {
			t.Errorf("Shutdown: %v, want the deadline error", err)
		}
		for _, c := range []net.Conn{conns.tunnel, conns.plain, conns.out} {
			wasReset(t, c)
		}
		for range 3 {
			checkLog(t, b.logs.next(t), map[string]string{"response_flags": absent, "error": errRevokedDrain.Error()})
		}
		b.checkMetrics(map[string]series{
			"connections_opened_total": {tunnel: 1, plainIn: 1, out: 1},
			"connections_closed_total": {tunnel: 1, plainIn: 1, out: 1},
			"received_bytes_total":     {tunnel: 6, plainIn: 5, out: 11},
			"sent_bytes_total":         {tunnel: 6, plainIn: 5, out: 11},
		})
	})
}

// TestStartFailures: each step of a workload's setup that fails undoes the
// steps before it and is reported by Ready and Workloads.
func TestStartFailures(t *testing.T) {
	tests := []struct {
		name string
		fail func(b *bed)
		want string
	}{
		{"namespace", func(b *bed) { b.net.openErr = func(string) error { return errors.New("gone") } }, "open netns /fake/server: gone"},
		{"certificate", func(b *bed) {
			b.certs.acquire = func(context.Context, identity.Identity) error { return errors.New("CA unreachable") }
		}, "certificate for spiffe://cluster.local/ns/default/sa/server: CA unreachable"},
		{"enroll", func(b *bed) { b.capture.enrollErr = errors.New("no slot") }, "enroll default/server-7d9f (server): no slot"},
		{"identity", func(b *bed) {}, `identity of default/server-7d9f (server): parse identity "spiffe://bad domain/ns/default/sa/server"...`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBed(t, bedOpts{noRun: true})
			tt.fail(b)
			snap := b.publish(func(c *config.Config) {
				if tt.name == "identity" {
					workload(c, "server").TrustDomain = "bad domain"
				}
			})
			w, _ := snap.WorkloadByUID("server")
			b.p.addWorkload(context.Background(), w)
			err := b.p.Ready()
			if err == nil || !matchDots(err.Error(), "...workload default/server-7d9f (server): "+tt.want+"...") {
				t.Errorf("Ready: %v, want the %s failure", err, tt.name)
			}
			var st WorkloadStatus
			for _, s := range b.p.Workloads() {
				if s.UID == "server" {
					st = s
				}
			}
			if st.Serving || !matchDots(st.Error, tt.want+"...") {
				t.Errorf("Workloads: %+v, want not serving with the %s failure", st, tt.name)
			}
			if b.certs.holds(serverID) != 0 {
				t.Errorf("certificate held %d times after a failed setup", b.certs.holds(serverID))
			}
			if ns := b.net.current("/fake/server"); ns != nil {
				if !ns.isClosed() {
					t.Error("namespace left open after a failed setup")
				}
				ns.mu.Lock()
				for addr, ln := range ns.listeners {
					if c, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr)); err == nil {
						c.Close()
						t.Errorf("listener for %s left open after a failed setup", addr)
					}
				}
				ns.mu.Unlock()
			}
			if _, ok := b.capture.cookieOf("/fake/server"); ok {
				t.Error("enrolled after a failed setup")
			}
		})
	}
}

// TestReady covers each state Ready reports.
func TestReady(t *testing.T) {
	b := newBed(t, bedOpts{noRun: true})
	if err := b.p.Ready(); err == nil || err.Error() != "configuration not loaded yet" {
		t.Errorf("Ready before any configuration: %v", err)
	}
	snap := b.publish(nil)
	if err := b.p.Ready(); err == nil || !strings.Contains(err.Error(), "workload default/client-5c8f (client): starting") ||
		!strings.Contains(err.Error(), "workload default/server-7d9f (server): starting") {
		t.Errorf("Ready with workloads not started: %v", err)
	}
	for _, uid := range []string{"client", "server"} {
		w, _ := snap.WorkloadByUID(uid)
		b.p.addWorkload(context.Background(), w)
	}
	if err := b.p.Ready(); err != nil {
		t.Errorf("Ready with every workload served: %v", err)
	}
}

// TestWorkloadsStatus checks the admin view of served workloads.
func TestWorkloadsStatus(t *testing.T) {
	b := newBed(t, bedOpts{})
	b.openAll() // one tunnel and one plaintext connection in, one connection out of the server
	got := map[string]WorkloadStatus{}
	for _, w := range b.p.Workloads() {
		got[w.UID] = w
	}
	want := map[string]WorkloadStatus{
		"client": {UID: "client", Name: "client-5c8f", Namespace: "default", Identity: clientID, IPs: []string{b.ip(11).String()},
			Netns: "/fake/client", Cookie: uint64(b.cookie("/fake/client")), Serving: true},
		"server": {UID: "server", Name: "server-7d9f", Namespace: "default", Identity: serverID, IPs: []string{b.ip(12).String()},
			Netns: "/fake/server", Cookie: uint64(b.cookie("/fake/server")), Serving: true, Open: 2},
	}
	if len(got) != len(want) {
		t.Fatalf("Workloads: %+v, want %+v", got, want)
	}
	for uid, w := range want {
		g := got[uid]
		if g.UID != w.UID || g.Name != w.Name || g.Namespace != w.Namespace || g.Identity != w.Identity || !slices.Equal(g.IPs, w.IPs) ||
			g.Netns != w.Netns || g.Cookie != w.Cookie || g.Serving != w.Serving || g.Open != w.Open || g.Error != "" {
			t.Errorf("Workloads[%s] = %+v, want %+v", uid, g, w)
		}
	}
	opts := b.capture.opts["/fake/server"]
	if opts.OutboundPort != loader.DefaultOutboundPort || opts.Inbound == nil {
		t.Errorf("enrolled with %+v, want the outbound port and the plaintext listener", opts)
	}
}

// TestReconcile: namespaces capture holds that no workload has are
// unenrolled once, after the first configuration.
func TestReconcile(t *testing.T) {
	b := newBed(t, bedOpts{capture: func(c *fakeCapture) Capture {
		c.stale = []loader.NetnsCookie{7, 8}
		return listingCapture{c}
	}})
	waitFor(t, "the stale namespaces are unenrolled", func() bool { return len(b.capture.unenrolled()) == 2 })
	if un := b.capture.unenrolled(); !slices.Equal(un, []loader.NetnsCookie{7, 8}) {
		t.Errorf("unenrolled %v, want [7 8] (and no served namespace)", un)
	}

	b.capture.mu.Lock()
	b.capture.listErr = errors.New("map gone")
	b.capture.mu.Unlock()
	if err := b.p.Reconcile(); err == nil || err.Error() != "list enrolled namespaces: map gone" {
		t.Errorf("Reconcile with a failing capture: %v", err)
	}
	plainCapture := newBed(t, bedOpts{noRun: true})
	if err := plainCapture.p.Reconcile(); err != nil {
		t.Errorf("Reconcile with a capture that cannot list: %v", err)
	}
}

// TestNew checks the required dependencies and the HBONE port's one source.
func TestNew(t *testing.T) {
	b := newBed(t, bedOpts{noRun: true})
	full := b.p.deps
	full.HBONEPort = 0
	tests := []struct {
		name     string
		change   func(d *Deps)
		wantErr  string
		wantPort uint16
	}{
		{"defaults", func(d *Deps) {}, "", loader.DefaultHBONEPort},
		{"no store", func(d *Deps) { d.Store = nil }, "ztunnel: Store, Capture, Certs, Tunnels and Balancer are required", 0},
		{"no balancer", func(d *Deps) { d.Balancer = nil }, "ztunnel: Store, Capture, Certs, Tunnels and Balancer are required", 0},
		{"port given", func(d *Deps) { d.HBONEPort = 15108 }, "", 15108},
		{"port from the capture", func(d *Deps) { d.Capture = portCapture{&fakeCapture{hbonePort: 15109}} }, "", 15109},
		{"same port given and in the capture", func(d *Deps) {
			d.Capture, d.HBONEPort = portCapture{&fakeCapture{hbonePort: 15109}}, 15109
		}, "", 15109},
		{"port that differs from the capture's", func(d *Deps) {
			d.Capture, d.HBONEPort = portCapture{&fakeCapture{hbonePort: 15109}}, 15008
		}, "ztunnel: HBONE port 15008 differs from the capture's 15109, whose sk_lookup would steer it", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := full
			tt.change(&d)
			p, err := New(d)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("New: %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.deps.HBONEPort != tt.wantPort {
				t.Errorf("HBONE port %d, want %d", p.deps.HBONEPort, tt.wantPort)
			}
		})
	}
}

// TestHBONEPortFromCapture: with the capture's port, the HBONE listeners
// and the tunnels agree on it end to end.
func TestHBONEPortFromCapture(t *testing.T) {
	b := newBed(t, bedOpts{capture: func(c *fakeCapture) Capture {
		c.hbonePort = 15108
		return portCapture{c}
	}})
	b.listener("/fake/server", netip.AddrPortFrom(netip.IPv6Unspecified(), 15108)) // fails the test when absent
	b.echoApp(b.ap(12, 9000), false)
	exchange(t, b.dialOutbound("/fake/client", b.ap(12, 9000)), "on 15108")
	checkLog(t, b.logs.nextWhere(t, "outbound"), map[string]string{"hbone.addr": b.ap(12, 15108).String(), "response_flags": absent})
}

// TestDialTunnel covers the tunnel dialer's refusals.
func TestDialTunnel(t *testing.T) {
	b := newBed(t, bedOpts{})
	if _, err := b.p.DialTunnel(context.Background(), "tcp", "198.18.0.1:15008"); err == nil || err.Error() != "dial tunnel to 198.18.0.1:15008: no source pod" {
		t.Errorf("DialTunnel without a request: %v", err)
	}
	req := hbone.Request{Source: spiffeid.RequireFromString(clientID), Expected: []spiffeid.ID{spiffeid.RequireFromString(serverID)}, Addr: b.ap(12, 15008), SourceIP: b.ip(99), Authority: b.ap(12, 80)}
	if _, err := b.pool.Dial(context.Background(), req); err == nil || !strings.Contains(err.Error(), "dial tunnel to "+b.ap(12, 15008).String()+": no local pod has "+b.ip(99).String()) {
		t.Errorf("tunnel from an address no pod has: %v", err)
	}
	// A pod whose namespace was released (its removal under way).
	b.net.current("/fake/client").Close()
	req.SourceIP = b.ip(11)
	if _, err := b.pool.Dial(context.Background(), req); err == nil || !strings.Contains(err.Error(), "workload default/client-5c8f (client): workload removed") {
		t.Errorf("tunnel from a released namespace: %v", err)
	}
}
