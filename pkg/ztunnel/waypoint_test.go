package ztunnel

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
)

const (
	waypointID   = "spiffe://cluster.local/ns/default/sa/waypoint"
	waypointHost = "waypoint.default.svc.cluster.local"
	waypointVIP  = "198.18.200.9"
)

// fakeWaypoint is an HBONE server standing in for a waypoint (node-b,
// .40): it records each CONNECT and relays it to an echo app.
type fakeWaypoint struct {
	reqs chan *hbone.ServerRequest
}

// startWaypoint serves HBONE at .40:15008 with the identity id.
func (b *bed) startWaypoint(id string) *fakeWaypoint {
	b.t.Helper()
	sid := spiffeid.RequireFromString(id)
	if _, ok := b.certs.svids[sid]; !ok {
		b.certs.svids[sid] = b.ca.Issue(b.t, sid)
	}
	tlsConf, err := b.certs.ServerConfig(identity.StaticServerIdentity(sid))
	if err != nil {
		b.t.Fatal(err)
	}
	echo := b.echoApp(b.ap(41, 1), false) // the waypoint's upstream
	fw := &fakeWaypoint{reqs: make(chan *hbone.ServerRequest, 16)}
	srv, err := hbone.NewServer(hbone.ServerConfig{TLS: tlsConf, Handler: hbone.HandlerFunc(
		func(ctx context.Context, req *hbone.ServerRequest) (net.Conn, error) {
			fw.reqs <- req
			var d net.Dialer
			return d.DialContext(ctx, "tcp4", echo.ln.Addr().String())
		})})
	if err != nil {
		b.t.Fatal(err)
	}
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.t.Fatal(err)
	}
	go srv.Serve(ln)
	b.t.Cleanup(func() { srv.Close() })
	b.net.route(b.ap(40, 15008), ln.Addr().(*net.TCPAddr).AddrPort())
	return fw
}

// next returns the next CONNECT the waypoint received.
func (fw *fakeWaypoint) next(t *testing.T) *hbone.ServerRequest {
	t.Helper()
	select {
	case r := <-fw.reqs:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("the waypoint got no CONNECT")
		return nil
	}
}

// withWaypoint adds the waypoint workload (.40, node-b) behind its service
// (VIP 198.18.200.9, port 15008), and sets the waypoint of the echo service
// and of the server workload as asked: by the waypoint service's VIP
// (svcVIP) or its workload's address (wlAddr).
func (b *bed) withWaypoint(svcWP, wlWP *config.Waypoint) func(*config.Config) {
	return func(c *config.Config) {
		wpKey := config.NamespacedHostname{Namespace: "default", Hostname: waypointHost}
		c.Workloads = append(c.Workloads, withMeta(&config.Workload{UID: "waypoint", Name: "waypoint-6b4d", Namespace: "default",
			ServiceAccount: "waypoint", WorkloadIPs: []netip.Addr{b.ip(40)}, Protocol: config.ProtocolTCP, Node: "node-b", Capacity: 1,
			Services: map[config.NamespacedHostname]config.PortMap{wpKey: {15008: 15008}}}, config.WorkloadMeta{WorkloadName: "waypoint"}, config.Locality{}))
		c.Services = append(c.Services, &config.Service{Name: "waypoint", Namespace: "default", Hostname: waypointHost,
			VIPs: []config.NetworkAddress{{Addr: netip.MustParseAddr(waypointVIP)}}, Ports: config.PortMap{15008: 15008}})
		c.Services[0].Waypoint = svcWP
		workload(c, "server").Waypoint = wlWP
	}
}

func byVIP(addr string) *config.Waypoint {
	return &config.Waypoint{Address: config.NetworkAddress{Addr: netip.MustParseAddr(addr)}, HBONEPort: 15008}
}

// TestWaypointOutbound: traffic to a service or workload with a waypoint
// goes over HBONE to the waypoint, with the original destination as
// authority and the waypoint's identity expected, never to the destination.
func TestWaypointOutbound(t *testing.T) {
	t.Run("service with a waypoint: to the waypoint, VIP as authority", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		b.publish(b.withWaypoint(byVIP(waypointVIP), nil))
		fw := b.startWaypoint(waypointID)
		c := b.dialOutbound("/fake/client", netip.MustParseAddrPort(vip))
		exchange(t, c, "through the waypoint")
		req := fw.next(t)
		if req.Authority.String() != vip || req.Peer.String() != clientID {
			t.Errorf("waypoint got authority %s from %s, want %s from %s", req.Authority, req.Peer, vip, clientID)
		}
		checkLog(t, b.logs.next(t), map[string]string{"direction": "outbound", "dst.addr": vip, "dst.service": svcHost,
			"dst.workload": "waypoint", "dst.identity": waypointID, "hbone.addr": b.ap(40, 15008).String(),
			"security": "mutual_tls", "response_flags": absent, "error": absent, "bytes_sent": "20"})
		waitFor(t, "no connection is tracked", func() bool { return b.openConns() == 0 })
		b.logs.none(t) // nothing reached the server's inbound
		b.bal.mu.Lock()
		defer b.bal.mu.Unlock()
		if len(b.bal.calls) != 1 || b.bal.calls[0].String() != waypointVIP+":15008" {
			t.Errorf("balancer asked for %v, want only the waypoint's service", b.bal.calls)
		}
	})
	t.Run("workload with a waypoint by address: workload address as authority", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		b.publish(b.withWaypoint(nil, &config.Waypoint{Address: config.NetworkAddress{Addr: b.ip(40)}}))
		fw := b.startWaypoint(waypointID)
		b.echoApp(b.ap(12, 9000), false)
		c := b.dialOutbound("/fake/client", b.ap(12, 9000))
		exchange(t, c, "hi")
		if req := fw.next(t); req.Authority != b.ap(12, 9000) {
			t.Errorf("waypoint got authority %s, want %s", req.Authority, b.ap(12, 9000))
		}
		checkLog(t, b.logs.next(t), map[string]string{"direction": "outbound", "dst.addr": b.ap(12, 9000).String(), "dst.service": "",
			"dst.workload": "waypoint", "hbone.addr": b.ap(40, 15008).String(), "response_flags": absent})
		waitFor(t, "no connection is tracked", func() bool { return b.openConns() == 0 })
		b.logs.none(t)
	})
	t.Run("service without a waypoint goes direct, even to an endpoint with one", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		b.publish(b.withWaypoint(nil, byVIP(waypointVIP)))
		fw := b.startWaypoint(waypointID)
		b.echoApp(b.ap(12, 8080), false)
		c := b.dialOutbound("/fake/client", netip.MustParseAddrPort(vip))
		exchange(t, c, "direct")
		got := map[string]map[string]string{}
		for range 2 {
			r := b.logs.next(t)
			got[r["direction"]] = r
		}
		checkLog(t, got["outbound"], map[string]string{"dst.workload": "server", "hbone.addr": b.ap(12, 15008).String(), "response_flags": absent})
		checkLog(t, got["inbound"], map[string]string{"dst.workload": "server", "src.identity": clientID, "response_flags": absent})
		if len(fw.reqs) != 0 {
			t.Error("the waypoint got a CONNECT")
		}
	})
	for _, tc := range []struct {
		name string
		svc  *config.Waypoint
		err  string
	}{
		{"waypoint address of no workload: UH, never direct", byVIP("198.18.200.77"),
			svcHost + ": waypoint /198.18.200.77:15008: unknown waypoint: no workload or service has address /198.18.200.77"},
		{"waypoint service unknown by hostname: UH", &config.Waypoint{Service: config.NamespacedHostname{Namespace: "default", Hostname: "gone.default.svc.cluster.local"}},
			svcHost + ": waypoint default/gone.default.svc.cluster.local:15008: unknown waypoint: service default/gone.default.svc.cluster.local is not known"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, bedOpts{})
			b.publish(b.withWaypoint(tc.svc, nil))
			b.echoApp(b.ap(12, 8080), false) // the endpoint would answer
			refused(t, b.dialOutbound("/fake/client", netip.MustParseAddrPort(vip)))
			checkLog(t, b.logs.next(t), map[string]string{"direction": "outbound", "response_flags": "UH", "dst.service": svcHost,
				"error": tc.err, "dst.workload": ""})
			b.checkMetrics(failedOnly(lbl("source", l(srcClient, viaSvc, flags("UH"))...)))
			b.logs.none(t)
		})
	}
	t.Run("waypoint service without a healthy endpoint: UH", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		b.publish(both(b.withWaypoint(byVIP(waypointVIP), nil), func(c *config.Config) { workload(c, "waypoint").Status = config.Unhealthy }))
		refused(t, b.dialOutbound("/fake/client", netip.MustParseAddrPort(vip)))
		checkLog(t, b.logs.next(t), map[string]string{"response_flags": "UH", "error": svcHost + ": waypoint /" + waypointVIP + ":15008: unknown waypoint: ...no healthy endpoint..."})
		b.logs.none(t)
	})
	t.Run("waypoint presents another identity: CONNECT", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		b.publish(b.withWaypoint(byVIP(waypointVIP), nil))
		fw := b.startWaypoint(impostorID)
		refused(t, b.dialOutbound("/fake/client", netip.MustParseAddrPort(vip)))
		checkLog(t, b.logs.next(t), map[string]string{"response_flags": "CONNECT", "dst.workload": "waypoint",
			"error": "HBONE to " + vip + " via waypoint default/waypoint-6b4d (waypoint) at " + b.ap(40, 15008).String() + ": ..."})
		if len(fw.reqs) != 0 {
			t.Error("the impostor got a CONNECT")
		}
		b.logs.none(t)
	})
	t.Run("the waypoint's own traffic goes direct", func(t *testing.T) {
		b := newBed(t, bedOpts{})
		// The client pod backs the waypoint's service: it is the waypoint.
		b.publish(both(b.withWaypoint(byVIP(waypointVIP), nil), func(c *config.Config) {
			workload(c, "client").Services = map[config.NamespacedHostname]config.PortMap{{Namespace: "default", Hostname: waypointHost}: {15008: 15008}}
		}))
		waitFor(t, "the client pod has the new configuration", func() bool {
			pd := b.podOf("client")
			return pd != nil && pd.workload().Services != nil
		})
		b.waitReady()
		b.echoApp(b.ap(12, 8080), false)
		exchange(t, b.dialOutbound("/fake/client", netip.MustParseAddrPort(vip)), "direct")
		got := map[string]map[string]string{}
		for range 2 {
			r := b.logs.next(t)
			got[r["direction"]] = r
		}
		checkLog(t, got["outbound"], map[string]string{"dst.workload": "server", "response_flags": absent})
	})
}

// TestWaypointInbound: a tunnel from the waypoint to a workload it fronts
// is accepted, and authorized against the waypoint's identity.
func TestWaypointInbound(t *testing.T) {
	for _, tc := range []struct {
		name   string
		config func(*config.Config)
		ok     bool
	}{
		{"accepted", nil, true},
		{"policy applies to the waypoint's identity", withPolicy("deny-waypoint", config.ActionDeny,
			config.Match{Principals: []config.StringMatch{{Kind: config.MatchExact, Value: "cluster.local/ns/default/sa/waypoint"}}}), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, bedOpts{})
			b.publish(both(b.withWaypoint(nil, &config.Waypoint{Address: config.NetworkAddress{Addr: b.ip(40)}}), tc.config))
			sid := spiffeid.RequireFromString(waypointID)
			b.certs.svids[sid] = b.ca.Issue(t, sid)
			b.echoApp(b.ap(12, 9000), false)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			s, err := b.remote.Dial(ctx, hbone.Request{Source: sid, Expected: []spiffeid.ID{spiffeid.RequireFromString(serverID)},
				Addr: b.ap(12, b.p.deps.HBONEPort), SourceIP: b.ip(40), Authority: b.ap(12, 9000)})
			if !tc.ok {
				if err == nil {
					s.Close()
					t.Fatal("the tunnel was accepted")
				}
				checkLog(t, b.logs.next(t), map[string]string{"direction": "inbound", "response_flags": "DENY", "src.identity": waypointID,
					"reason": "deny (deny_matched default/deny-waypoint)"})
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			exchange(t, s, "from the waypoint")
			checkLog(t, b.logs.next(t), map[string]string{"direction": "inbound", "src.workload": "waypoint", "src.identity": waypointID,
				"src.addr": b.ip(40).String() + ":...", "dst.workload": "server", "response_flags": absent})
		})
	}
}
