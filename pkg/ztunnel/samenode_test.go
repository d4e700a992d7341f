package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/warren-mesh/warren/pkg/config"
)

// sameNodeBed is a bed with the fast path on and a tunnel dialer that
// refuses and records: the fast path must never open a tunnel.
func sameNodeBed(t *testing.T, cfg func(*config.Config)) (*bed, *fakeTunnels) {
	t.Helper()
	tun := &fakeTunnels{err: errors.New("no tunnel expected")}
	return newBed(t, bedOpts{sameNode: true, tunnels: tun, config: cfg}), tun
}

// noTunnels checks that no HBONE tunnel was asked for.
func noTunnels(t *testing.T, tun *fakeTunnels) {
	t.Helper()
	tun.mu.Lock()
	defer tun.mu.Unlock()
	if len(tun.reqs) != 0 {
		t.Errorf("the fast path asked for %d tunnel(s), first to %s", len(tun.reqs), tun.reqs[0].Addr)
	}
}

// records returns the next n access-log records by direction.
func (b *bed) records(n int) map[string]map[string]string {
	b.t.Helper()
	got := map[string]map[string]string{}
	for range n {
		r := b.logs.next(b.t)
		if _, dup := got[r["direction"]]; dup {
			b.t.Fatalf("two %s records: %v and %v", r["direction"], got[r["direction"]], r)
		}
		got[r["direction"]] = r
	}
	return got
}

// TestSameNode: a connection between two pods of the agent skips HBONE and
// keeps what HBONE shows: both records with both principals and
// mutual_tls, the client's address at the destination, byte counts.
func TestSameNode(t *testing.T) {
	for _, tt := range []struct {
		name   string
		orig   func(b *bed) netip.AddrPort
		app    func(b *bed) netip.AddrPort
		msg    string
		srcSvc []string // the source's service labels
	}{
		{name: "to a workload address", orig: func(b *bed) netip.AddrPort { return b.ap(12, 9000) },
			app: func(b *bed) netip.AddrPort { return b.ap(12, 9000) }, msg: "hello"},
		{name: "to a service VIP: endpoint and target port", orig: func(b *bed) netip.AddrPort { return netip.MustParseAddrPort(vip) },
			app: func(b *bed) netip.AddrPort { return b.ap(12, 8080) }, msg: "via the service", srcSvc: viaSvc},
		{name: "1 MiB each way", orig: func(b *bed) netip.AddrPort { return b.ap(12, 9000) },
			app: func(b *bed) netip.AddrPort { return b.ap(12, 9000) }, msg: strings.Repeat("0123456789abcdef", 1<<16)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b, tun := sameNodeBed(t, nil)
			b.echoApp(tt.app(b), false)
			c := b.dialOutbound("/fake/client", tt.orig(b))
			srcPort := c.LocalAddr().(*net.TCPAddr).Port
			exchange(t, c, tt.msg)
			n := fmt.Sprint(len(tt.msg))
			got := b.records(2)
			checkLog(t, got["outbound"], map[string]string{"reporter": "source", "src.addr": fmt.Sprintf("%s:%d", b.ip(11), srcPort),
				"src.identity": clientID, "dst.addr": tt.app(b).String(), "dst.workload": "server", "dst.identity": serverID,
				"security": "mutual_tls", "same_node": "true", "hbone.addr": absent, "bytes_received": n, "bytes_sent": n,
				"response_flags": absent, "error": absent, "trace_id": present})
			checkLog(t, got["inbound"], map[string]string{"reporter": "destination", "src.addr": fmt.Sprintf("%s:%d", b.ip(11), srcPort),
				"src.workload": "client", "src.namespace": "default", "src.identity": clientID, "dst.addr": tt.app(b).String(),
				"dst.workload": "server", "dst.identity": serverID, "security": "mutual_tls", "same_node": "true",
				"bytes_received": n, "bytes_sent": n, "response_flags": absent, "error": absent, "trace_id": got["outbound"]["trace_id"]})
			size := float64(len(tt.msg))
			b.checkMetrics(merge(
				through(lbl("source", l(srcClient, dstServer, tt.srcSvc, mtls)...), 1, size, size),
				through(lbl("destination", l(srcClient, dstServer, mtls)...), 1, size, size)))
			noTunnels(t, tun)
			waitFor(t, "no connection is tracked", func() bool { return b.openConns() == 0 })
		})
	}
}

// TestSameNodeRefusals: the destination's checks run on the fast path as on
// a tunnel: a DENY policy on the client's identity refuses it (DENY at the
// destination, CONNECT at the source, as for a 401), and so does an app
// that is not listening (CONNECT on both sides).
func TestSameNodeRefusals(t *testing.T) {
	t.Run("DENY policy", func(t *testing.T) {
		b, tun := sameNodeBed(t, withPolicy("deny-client", config.ActionDeny, config.Match{Principals: []config.StringMatch{{Kind: config.MatchExact, Value: "cluster.local/ns/default/sa/client"}}}))
		b.echoApp(b.ap(12, 9000), false)
		refused(t, b.dialOutbound("/fake/client", b.ap(12, 9000)))
		got := b.records(2)
		checkLog(t, got["inbound"], map[string]string{"response_flags": "DENY", "reason": "deny (deny_matched default/deny-client)", "same_node": "true", "src.identity": clientID})
		checkLog(t, got["outbound"], map[string]string{"response_flags": "CONNECT", "error": "same-node to " + b.ap(12, 9000).String() + ": deny...", "same_node": "true"})
		b.checkMetrics(failedOnly(
			lbl("source", l(srcClient, dstServer, mtls, flags("CONNECT"))...),
			lbl("destination", l(srcClient, dstServer, mtls, flags("DENY"))...)))
		noTunnels(t, tun)
	})
	t.Run("ALLOW policy for another identity", func(t *testing.T) {
		b, _ := sameNodeBed(t, withPolicy("allow-remote", config.ActionAllow, config.Match{Principals: []config.StringMatch{{Kind: config.MatchExact, Value: "cluster.local/ns/prod/sa/remote"}}}))
		b.echoApp(b.ap(12, 9000), false)
		refused(t, b.dialOutbound("/fake/client", b.ap(12, 9000)))
		got := b.records(2)
		checkLog(t, got["inbound"], map[string]string{"response_flags": "DENY", "reason": present})
	})
	t.Run("app not listening", func(t *testing.T) {
		b, _ := sameNodeBed(t, nil)
		refused(t, b.dialOutbound("/fake/client", b.ap(12, 9001)))
		got := b.records(2)
		checkLog(t, got["inbound"], map[string]string{"response_flags": "CONNECT", "error": "dial " + b.ap(12, 9001).String() + "..."})
		checkLog(t, got["outbound"], map[string]string{"response_flags": "CONNECT", "error": present})
		b.checkMetrics(failedOnly(
			lbl("source", l(srcClient, dstServer, mtls, flags("CONNECT"))...),
			lbl("destination", l(srcClient, dstServer, mtls, flags("CONNECT"))...)))
	})
}

// TestSameNodeOtherPaths: what is not two pods of this agent, or has a
// waypoint on the route, or runs without the option, takes HBONE as before.
func TestSameNodeOtherPaths(t *testing.T) {
	t.Run("option off: HBONE", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		b.echoApp(b.ap(12, 9000), false)
		exchange(t, b.dialOutbound("/fake/client", b.ap(12, 9000)), "tunnelled")
		got := b.records(2)
		checkLog(t, got["outbound"], map[string]string{"hbone.addr": b.ap(12, 15008).String(), "same_node": absent, "response_flags": absent})
		checkLog(t, got["inbound"], map[string]string{"same_node": absent, "response_flags": absent})
	})
	t.Run("remote destination: HBONE", func(t *testing.T) {
		b, tun := sameNodeBed(t, nil)
		refused(t, b.dialOutbound("/fake/client", b.ap(30, 9000)))
		checkLog(t, b.logs.next(t), map[string]string{"direction": "outbound", "hbone.addr": b.ap(30, 15008).String(), "same_node": absent, "response_flags": "CONNECT"})
		tun.mu.Lock()
		defer tun.mu.Unlock()
		if len(tun.reqs) != 1 || tun.reqs[0].Addr != b.ap(30, 15008) {
			t.Errorf("tunnels asked for: %v, want one to the remote's agent", tun.reqs)
		}
	})
	t.Run("waypoint on the route wins", func(t *testing.T) {
		b, tun := sameNodeBed(t, nil)
		b.publish(b.withWaypoint(byVIP(waypointVIP), byVIP(waypointVIP)))
		for _, orig := range []netip.AddrPort{netip.MustParseAddrPort(vip), b.ap(12, 9000)} {
			refused(t, b.dialOutbound("/fake/client", orig))
			checkLog(t, b.logs.next(t), map[string]string{"direction": "outbound", "dst.workload": "waypoint", "hbone.addr": b.ap(40, 15008).String(), "same_node": absent})
		}
		tun.mu.Lock()
		defer tun.mu.Unlock()
		if len(tun.reqs) != 2 || tun.reqs[0].Addr != b.ap(40, 15008) || tun.reqs[1].Addr != b.ap(40, 15008) {
			t.Errorf("tunnels asked for: %v, want two to the waypoint", tun.reqs)
		}
		b.logs.none(t)
	})
	t.Run("destination outside the mesh: passthrough", func(t *testing.T) {
		b, tun := sameNodeBed(t, func(c *config.Config) { workload(c, "server").Protocol = config.ProtocolTCP })
		b.echoApp(b.ap(12, 9000), false)
		exchange(t, b.dialOutbound("/fake/client", b.ap(12, 9000)), "plain")
		checkLog(t, b.logs.next(t), map[string]string{"direction": "outbound", "security": "unknown", "same_node": absent})
		noTunnels(t, tun)
		b.logs.none(t)
	})
}

// TestSameNodeTracked: fast-path connections are tracked on both sides like
// tunnelled ones: a policy change resets one it no longer allows (DENY at
// the destination), a removed destination resets its connections, and the
// drain deadline resets the rest.
func TestSameNodeTracked(t *testing.T) {
	t.Run("policy change", func(t *testing.T) {
		b, _ := sameNodeBed(t, nil)
		b.echoApp(b.ap(12, 9000), false)
		c := b.dialOutbound("/fake/client", b.ap(12, 9000))
		echoOnce(t, c, "open")
		waitFor(t, "both sides are tracked", func() bool { return b.openConns() == 2 })
		b.publish(withPolicy("deny-client", config.ActionDeny, config.Match{Principals: []config.StringMatch{{Kind: config.MatchExact, Value: "cluster.local/ns/default/sa/client"}}}))
		wasReset(t, c)
		got := b.records(2)
		checkLog(t, got["inbound"], map[string]string{"response_flags": "DENY", "error": errRevokedPolicy.Error(), "bytes_received": "4", "bytes_sent": "4"})
		checkLog(t, got["outbound"], map[string]string{"response_flags": "CONNECT", "bytes_received": "4"})
		waitFor(t, "no connection is tracked", func() bool { return b.openConns() == 0 })
	})
	t.Run("destination removed", func(t *testing.T) {
		b, _ := sameNodeBed(t, nil)
		b.echoApp(b.ap(12, 9000), false)
		c := b.dialOutbound("/fake/client", b.ap(12, 9000))
		echoOnce(t, c, "open")
		b.publish(without("server"))
		wasReset(t, c)
		got := b.records(2)
		checkLog(t, got["inbound"], map[string]string{"response_flags": absent, "error": errRevokedRemoved.Error()})
		waitFor(t, "no connection is tracked", func() bool { return b.openConns() == 0 })
	})
	t.Run("drain: ends by itself, or reset at the deadline", func(t *testing.T) {
		b, _ := sameNodeBed(t, nil)
		b.echoApp(b.ap(12, 9000), false)
		done := b.dialOutbound("/fake/client", b.ap(12, 9000))
		held := b.dialOutbound("/fake/client", b.ap(12, 9000))
		echoOnce(t, done, "a")
		echoOnce(t, held, "b")
		b.stopRun()
		ctx, cancel := context.WithCancel(context.Background())
		shut := make(chan error, 1)
		go func() { shut <- b.p.Shutdown(ctx) }()
		exchange(t, done, "finishing") // served while draining
		got := b.records(2)
		checkLog(t, got["outbound"], map[string]string{"response_flags": absent, "error": absent, "bytes_sent": "10"})
		select {
		case err := <-shut:
			t.Fatalf("Shutdown returned %v with a connection open", err)
		default:
		}
		cancel()
		if err := <-shut; err == nil || !strings.Contains(err.Error(), "2 connection(s) open") {
			t.Errorf("Shutdown: %v, want the deadline with both sides of one connection open", err)
		}
		wasReset(t, held)
		got = b.records(2)
		for _, dir := range []string{"inbound", "outbound"} {
			checkLog(t, got[dir], map[string]string{"error": errRevokedDrain.Error(), "response_flags": absent})
		}
	})
}

// TestSameNodePeer: the fast path is only taken to a pod this agent serves
// whose enrolled identity is one the source would accept from the tunnel's
// peer; otherwise HBONE decides (and fails the handshake if it must).
func TestSameNodePeer(t *testing.T) {
	b, _ := sameNodeBed(t, nil)
	server, _ := b.store.Current().WorkloadByUID("server")
	if _, ok := b.p.sameNodePeer(route{dst: server, addr: b.ap(12, 9000)}); !ok {
		t.Fatal("no fast path to the local server")
	}
	other := *server
	other.ServiceAccount = "impostor" // the route expects another identity than the one enrolled
	if _, ok := b.p.sameNodePeer(route{dst: &other, addr: b.ap(12, 9000)}); ok {
		t.Error("fast path to a pod whose enrolled identity the source does not expect")
	}
	svc := &config.Service{Name: "echo", Namespace: "default", Hostname: svcHost, SubjectAltNames: []string{serverID}}
	if _, ok := b.p.sameNodePeer(route{svc: svc, dst: &other, addr: b.ap(12, 9000)}); !ok {
		t.Error("no fast path when the service's SANs name the enrolled identity")
	}
	remote, _ := b.store.Current().WorkloadByUID("remote")
	if _, ok := b.p.sameNodePeer(route{dst: remote, addr: b.ap(30, 9000)}); ok {
		t.Error("fast path to a pod of another node")
	}
	b.p.deps.SameNodeFastPath = false
	if _, ok := b.p.sameNodePeer(route{dst: server, addr: b.ap(12, 9000)}); ok {
		t.Error("fast path with the option off")
	}
}
