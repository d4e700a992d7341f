package ztunnel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/loader"
)

// TestOutbound runs every outcome of handleOutbound through the pod's 15001
// listener, and checks the istio_tcp_* series and access-log records each
// produces, on both reporters when the destination is local too.
func TestOutbound(t *testing.T) {
	type outcome struct {
		metrics map[string]series
		logs    map[string]map[string]string // by direction
	}
	tests := []struct {
		name   string
		config func(*config.Config)
		// setup starts what the destination needs and returns the original
		// destination; an invalid one means capture lost it.
		setup func(b *bed) netip.AddrPort
		// client talks; the default expects the proxy to refuse.
		client func(t *testing.T, b *bed, c *net.TCPConn)
		want   func(b *bed, c *net.TCPConn) outcome
	}{
		{
			name: "HBONE to a workload address",
			setup: func(b *bed) netip.AddrPort {
				b.echoApp(b.ap(12, 9000), false)
				return b.ap(12, 9000)
			},
			client: func(t *testing.T, b *bed, c *net.TCPConn) { exchange(t, c, "hello") },
			want: func(b *bed, c *net.TCPConn) outcome {
				srcPort := c.LocalAddr().(*net.TCPAddr).Port
				return outcome{
					metrics: merge(
						through(lbl("source", l(srcClient, dstServer, mtls)...), 1, 5, 5),
						through(lbl("destination", l(srcClient, dstServer, mtls)...), 1, 5, 5)),
					logs: map[string]map[string]string{
						"outbound": {"reporter": "source", "src.addr": fmt.Sprintf("%s:%d", b.ip(11), srcPort), "src.workload": "client",
							"src.namespace": "default", "src.identity": clientID, "dst.addr": b.ap(12, 9000).String(), "dst.workload": "server",
							"dst.namespace": "default", "dst.identity": serverID, "dst.service": "", "security": "mutual_tls",
							"hbone.addr": b.ap(12, 15008).String(), "bytes_received": "5", "bytes_sent": "5", "duration_ms": present,
							"response_flags": absent, "error": absent, "reason": absent},
						// The client's port reaches the destination in Forwarded.
						"inbound": {"reporter": "destination", "src.addr": fmt.Sprintf("%s:%d", b.ip(11), srcPort), "src.workload": "client",
							"src.identity": clientID, "dst.addr": b.ap(12, 9000).String(), "dst.workload": "server", "dst.identity": serverID,
							"security": "mutual_tls", "bytes_received": "5", "bytes_sent": "5", "hbone.addr": absent,
							"response_flags": absent, "error": absent},
					},
				}
			},
		},
		{
			name: "HBONE to a service VIP: endpoint and target port",
			setup: func(b *bed) netip.AddrPort {
				b.echoApp(b.ap(12, 8080), false)
				return netip.MustParseAddrPort(vip)
			},
			client: func(t *testing.T, b *bed, c *net.TCPConn) { exchange(t, c, "via the service") },
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: merge(
						through(lbl("source", l(srcClient, dstServer, viaSvc, mtls)...), 1, 15, 15),
						through(lbl("destination", l(srcClient, dstServer, mtls)...), 1, 15, 15)),
					logs: map[string]map[string]string{
						"outbound": {"dst.addr": b.ap(12, 8080).String(), "dst.service": svcHost, "hbone.addr": b.ap(12, 15008).String()},
						"inbound":  {"dst.addr": b.ap(12, 8080).String(), "dst.service": ""},
					},
				}
			},
		},
		{
			name: "plain TCP to a workload outside the mesh: no identity presented",
			setup: func(b *bed) netip.AddrPort {
				b.echoApp(b.ap(13, 5432), false)
				return b.ap(13, 5432)
			},
			client: func(t *testing.T, b *bed, c *net.TCPConn) { exchange(t, c, "select 1") },
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: through(lbl("source", l(srcClient[:4], dstLegacy, plain)...), 1, 8, 8),
					logs: map[string]map[string]string{"outbound": {"src.identity": "", "dst.workload": "legacy", "security": "unknown",
						"hbone.addr": absent, "response_flags": absent, "bytes_received": "8"}},
				}
			},
		},
		{
			name: "passthrough to an address the mesh does not know",
			setup: func(b *bed) netip.AddrPort {
				b.echoApp(b.ap(99, 443), false)
				return b.ap(99, 443)
			},
			client: func(t *testing.T, b *bed, c *net.TCPConn) { exchange(t, c, "hi") },
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: through(lbl("source", l(srcClient[:4], plain)...), 1, 2, 2),
					logs:    map[string]map[string]string{"outbound": {"dst.addr": b.ap(99, 443).String(), "dst.workload": "", "response_flags": absent}},
				}
			},
		},
		{
			name:  "original destination lost: NR",
			setup: func(b *bed) netip.AddrPort { return netip.AddrPort{} },
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: failedOnly(lbl("source", l(srcClient, flags("NR"))...)),
					logs:    map[string]map[string]string{"outbound": {"response_flags": "NR", "error": "no entry for the connection"}},
				}
			},
		},
		{
			name: "service without a healthy endpoint: UH",
			config: func(c *config.Config) {
				workload(c, "server").Status = config.Unhealthy
			},
			setup: func(b *bed) netip.AddrPort { return netip.MustParseAddrPort(vip) },
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: failedOnly(lbl("source", l(srcClient, viaSvc, flags("UH"))...)),
					logs: map[string]map[string]string{"outbound": {"response_flags": "UH", "dst.service": svcHost,
						"error": svcHost + ": service default/" + svcHost + " port 80: no healthy endpoint..."}},
				}
			},
		},
		{
			name:  "passthrough destination refuses: CONNECT",
			setup: func(b *bed) netip.AddrPort { return b.ap(99, 444) },
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: failedOnly(lbl("source", l(srcClient[:4], plain, flags("CONNECT"))...)),
					logs: map[string]map[string]string{"outbound": {"response_flags": "CONNECT",
						"error": "dial " + b.ap(99, 444).String() + ": ...connection refused"}},
				}
			},
		},
		{
			name:   "destination policy denies the tunnel: CONNECT at the source, DENY at the destination",
			config: withPolicy("deny-client", config.ActionDeny, config.Match{Principals: []config.StringMatch{{Kind: config.MatchExact, Value: "cluster.local/ns/default/sa/client"}}}),
			setup: func(b *bed) netip.AddrPort {
				b.echoApp(b.ap(12, 9000), false)
				return b.ap(12, 9000)
			},
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: failedOnly(
						lbl("source", l(srcClient, dstServer, mtls, flags("CONNECT"))...),
						lbl("destination", l(srcClient, dstServer, mtls, flags("DENY"))...)),
					logs: map[string]map[string]string{
						"outbound": {"response_flags": "CONNECT", "error": "HBONE to " + b.ap(12, 9000).String() + "...", "reason": absent},
						"inbound":  {"response_flags": "DENY", "reason": "deny (deny_matched default/deny-client)", "error": absent},
					},
				}
			},
		},
		{
			name:  "app not listening behind the tunnel: CONNECT on both sides",
			setup: func(b *bed) netip.AddrPort { return b.ap(12, 9001) },
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: failedOnly(
						lbl("source", l(srcClient, dstServer, mtls, flags("CONNECT"))...),
						lbl("destination", l(srcClient, dstServer, mtls, flags("CONNECT"))...)),
					logs: map[string]map[string]string{
						"outbound": {"response_flags": "CONNECT", "error": present},
						"inbound":  {"response_flags": "CONNECT", "error": "dial " + b.ap(12, 9001).String() + "..."},
					},
				}
			},
		},
		{
			name: "destination presents another identity: TLS fails, CONNECT",
			setup: func(b *bed) netip.AddrPort {
				b.certs.present[spiffeid.RequireFromString(serverID)] = b.certs.svids[spiffeid.RequireFromString(impostorID)]
				b.echoApp(b.ap(12, 9000), false)
				return b.ap(12, 9000)
			},
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					// The destination's HBONE server refuses the handshake before any handler runs.
					metrics: failedOnly(lbl("source", l(srcClient, dstServer, mtls, flags("CONNECT"))...)),
					logs:    map[string]map[string]string{"outbound": {"response_flags": "CONNECT", "error": present}},
				}
			},
		},
		{
			name: "no source address of the destination's family: CONNECT",
			config: func(c *config.Config) {
				c.Workloads = append(c.Workloads, &config.Workload{UID: "v6", Name: "v6", Namespace: "default", ServiceAccount: "v6",
					WorkloadIPs: []netip.Addr{netip.MustParseAddr("2001:db8::5")}, Protocol: config.ProtocolHBONE, Node: "node-b"})
			},
			setup: func(b *bed) netip.AddrPort { return netip.MustParseAddrPort("[2001:db8::5]:80") },
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: failedOnly(lbl("source", l(srcClient, mtls, flags("CONNECT"),
						[]string{"destination_workload", "v6", "destination_workload_namespace", "default", "destination_principal", "spiffe://cluster.local/ns/default/sa/v6"})...)),
					logs: map[string]map[string]string{"outbound": {"response_flags": "CONNECT",
						"error": "workload default/client-5c8f (client) has no IPv6 address to reach [2001:db8::5]:80 from", "hbone.addr": "[2001:db8::5]:15008"}},
				}
			},
		},
		{
			name: "service subject alt name that is no SPIFFE ID: CONNECT",
			config: func(c *config.Config) {
				c.Services[0].SubjectAltNames = []string{"not an id"}
			},
			setup: func(b *bed) netip.AddrPort { return netip.MustParseAddrPort(vip) },
			want: func(b *bed, c *net.TCPConn) outcome {
				return outcome{
					metrics: failedOnly(lbl("source", l(srcClient, dstServer, viaSvc, mtls, flags("CONNECT"))...)),
					logs:    map[string]map[string]string{"outbound": {"response_flags": "CONNECT", "error": "service " + svcHost + ` subjectAltName "not an id"...`}},
				}
			},
		},
		{
			name: "client resets mid-relay: CONNECT on close, bytes under the opening labels",
			setup: func(b *bed) netip.AddrPort {
				a := b.echoApp(b.ap(99, 7000), true)
				go func() {
					// The app reads what it got, says so, and waits.
					c := <-a.conns
					defer c.Close()
					buf := make([]byte, 3)
					if _, err := io.ReadFull(c, buf); err == nil {
						close(b.note)
					}
					io.Copy(io.Discard, c)
				}()
				return b.ap(99, 7000)
			},
			client: func(t *testing.T, b *bed, c *net.TCPConn) {
				if _, err := c.Write([]byte("abc")); err != nil {
					t.Fatal(err)
				}
				select {
				case <-b.note:
				case <-time.After(10 * time.Second):
					t.Fatal("the app never got the bytes")
				}
				reset(c)
			},
			want: func(b *bed, c *net.TCPConn) outcome {
				open := lbl("source", l(srcClient[:4], plain)...)
				closed := lbl("source", l(srcClient[:4], plain, flags("CONNECT"))...)
				return outcome{
					metrics: map[string]series{
						"connections_opened_total": {open: 1},
						"connections_closed_total": {closed: 1},
						"connections_failed_total": {closed: 1},
						"received_bytes_total":     {open: 3},
						"sent_bytes_total":         {open: 0},
					},
					logs: map[string]map[string]string{"outbound": {"response_flags": "CONNECT", "bytes_received": "3", "error": present}},
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBed(t, bedOpts{config: tt.config})
			orig := tt.setup(b)
			var c *net.TCPConn
			if orig.IsValid() {
				c = b.dialOutbound("/fake/client", orig)
			} else {
				c = b.dialOutboundLost("/fake/client")
			}
			if tt.client != nil {
				tt.client(t, b, c)
			} else {
				refused(t, c)
			}
			want := tt.want(b, c)
			got := map[string]map[string]string{}
			for range want.logs {
				r := b.logs.next(t)
				got[r["direction"]] = r
			}
			for dir, w := range want.logs {
				if got[dir] == nil {
					t.Errorf("no %s access-log record; got %v", dir, got)
					continue
				}
				checkLog(t, got[dir], w)
			}
			waitFor(t, "no connection is tracked", func() bool { return b.openConns() == 0 })
			b.checkMetrics(want.metrics)
			b.logs.none(t)
		})
	}
}

// dialOutboundLost connects as an app whose original destination capture
// cannot find.
func (b *bed) dialOutboundLost(path string) *net.TCPConn {
	b.t.Helper()
	c, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(b.listener(path, outbound4)))
	if err != nil {
		b.t.Fatal(err)
	}
	b.t.Cleanup(func() { c.Close() })
	b.capture.setOrig(c.LocalAddr().(*net.TCPAddr).AddrPort(), netip.AddrPort{}, errors.New("no entry for the connection"))
	return c
}

// TestOutboundTunnelRequest checks what the proxy asks of its tunnels for a
// service VIP: the pod's identity and address, the endpoint's identity and
// the service's SANs, the HBONE port, the endpoint as authority, and the
// client's address in Forwarded.
func TestOutboundTunnelRequest(t *testing.T) {
	tunnels := &fakeTunnels{err: &hbone.StatusError{Code: 503}}
	b := newBed(t, bedOpts{tunnels: tunnels, config: func(c *config.Config) {
		c.Services[0].SubjectAltNames = []string{"cluster.local/ns/default/sa/canary", "spiffe://cluster.local/ns/default/sa/other"}
	}})
	c := b.dialOutbound("/fake/client", netip.MustParseAddrPort(vip))
	refused(t, c)
	r := b.logs.next(t)
	checkLog(t, r, map[string]string{"response_flags": "CONNECT", "error": "HBONE to " + b.ap(12, 8080).String() + " via " + b.ap(12, 15008).String() + ": hbone: status 503..."})
	tunnels.mu.Lock()
	defer tunnels.mu.Unlock()
	if len(tunnels.reqs) != 1 {
		t.Fatalf("%d tunnel requests, want 1", len(tunnels.reqs))
	}
	req := tunnels.reqs[0]
	var expected []string
	for _, id := range req.Expected {
		expected = append(expected, id.String())
	}
	srcPort := c.LocalAddr().(*net.TCPAddr).Port
	for _, chk := range []struct{ what, got, want string }{
		{"source", req.Source.String(), clientID},
		{"expected", strings.Join(expected, " "), serverID + " spiffe://cluster.local/ns/default/sa/canary spiffe://cluster.local/ns/default/sa/other"},
		{"addr", req.Addr.String(), b.ap(12, loader.DefaultHBONEPort).String()},
		{"source IP", req.SourceIP.String(), b.ip(11).String()},
		{"authority", req.Authority.String(), b.ap(12, 8080).String()},
		{"forwarded", req.Headers.Get("Forwarded"), fmt.Sprintf(`for="%s:%d"`, b.ip(11), srcPort)},
	} {
		if chk.got != chk.want {
			t.Errorf("tunnel request %s = %q, want %q", chk.what, chk.got, chk.want)
		}
	}
	b.bal.mu.Lock()
	defer b.bal.mu.Unlock()
	if len(b.bal.calls) != 1 || b.bal.calls[0].String() != vip {
		t.Errorf("balancer asked for %v, want [%s]", b.bal.calls, vip)
	}
}

// TestDialFailureFlag checks the flag of each kind of upstream failure.
func TestDialFailureFlag(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"TCP connect refused", errors.New("dial 198.18.0.1:80: connection refused"), flagConnect},
		{"CONNECT answered 401", fmt.Errorf("HBONE to x: %w", &hbone.StatusError{Code: 401}), flagConnect},
		{"CONNECT answered 503", &hbone.StatusError{Code: 503}, flagConnect},
		{"tunnel connect timed out", fmt.Errorf("hbone dial x: %w", fmt.Errorf("from y: %w: %w", errTunnelTimeout, errors.New("deadline"))), flagNetworkPolicy},
		{"TLS handshake failed", errors.New("hbone dial x: tls handshake: bad certificate"), flagConnect},
	}
	for _, tt := range tests {
		if got := dialFailureFlag(tt.err); got != tt.want {
			t.Errorf("%s: dialFailureFlag(%v) = %s, want %s", tt.name, tt.err, got, tt.want)
		}
	}
}
