package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
)

// TestHBONEInbound runs every outcome of the HBONE handler: a tunnel from
// the remote workload's agent (node-b) to the server pod's 15008.
func TestHBONEInbound(t *testing.T) {
	type outcome struct {
		status  int // the CONNECT's answer: 200 relays
		metrics map[string]series
		log     map[string]string
	}
	tests := []struct {
		name   string
		config func(*config.Config)
		from   func(b *bed) netip.Addr // the tunnel's source address (default: remote's)
		dst    func(b *bed) netip.AddrPort
		hdr    func(b *bed) map[string]string
		app    bool // an echo app listens at dst
		client func(t *testing.T, b *bed, s *hbone.Stream)
		want   func(b *bed) outcome
	}{
		{
			name: "allowed: relayed to the app, client port from Forwarded",
			dst:  func(b *bed) netip.AddrPort { return b.ap(12, 9000) },
			hdr: func(b *bed) map[string]string {
				return map[string]string{"Forwarded": fmt.Sprintf("for=%q", b.ap(30, 4242))}
			},
			app: true,
			want: func(b *bed) outcome {
				return outcome{status: 200, metrics: through(lbl("destination", l(srcRemote, dstServer, mtls)...), 1, 4, 4),
					log: map[string]string{"direction": "inbound", "reporter": "destination", "src.addr": b.ap(30, 4242).String(),
						"src.workload": "remote", "src.namespace": "prod", "src.identity": remoteID, "dst.addr": b.ap(12, 9000).String(),
						"dst.workload": "server", "dst.namespace": "default", "dst.identity": serverID, "dst.service": "",
						"security": "mutual_tls", "bytes_received": "4", "bytes_sent": "4", "hbone.addr": absent,
						"response_flags": absent, "error": absent, "reason": absent}}
			},
		},
		{
			name: "Forwarded naming another address is ignored",
			dst:  func(b *bed) netip.AddrPort { return b.ap(12, 9000) },
			hdr:  func(*bed) map[string]string { return map[string]string{"Forwarded": `for="10.1.2.3:4242"`} },
			app:  true,
			want: func(b *bed) outcome {
				return outcome{status: 200, metrics: through(lbl("destination", l(srcRemote, dstServer, mtls)...), 1, 4, 4),
					log: map[string]string{"src.addr": b.ip(30).String() + ":...", "src.workload": "remote"}}
			},
		},
		{
			// The app would see the tunnel's source as the client: an address
			// that is not a workload of the peer's identity is refused.
			name: "peer from an address that is not its workload's: 401, refused and counted",
			from: func(b *bed) netip.Addr { return b.ip(13) }, // legacy's address
			dst:  func(b *bed) netip.AddrPort { return b.ap(12, 9000) },
			app:  true,
			want: func(b *bed) outcome {
				return outcome{status: 401,
					metrics: failedOnly(lbl("destination", l(dstServer, mtls, flags("DENY"), []string{"source_workload_namespace", "prod", "source_principal", remoteID})...)),
					log:     map[string]string{"src.addr": b.ip(13).String() + ":...", "src.workload": "", "src.namespace": "prod", "src.identity": remoteID, "response_flags": "DENY"}}
			},
		},
		{
			name: "DENY policy: 401 and DENY",
			config: withPolicy("deny-prod", config.ActionDeny, config.Match{
				Namespaces: []config.StringMatch{{Kind: config.MatchExact, Value: "prod"}}}),
			dst: func(b *bed) netip.AddrPort { return b.ap(12, 9000) },
			app: true,
			want: func(b *bed) outcome {
				return outcome{status: 401, metrics: failedOnly(lbl("destination", l(srcRemote, dstServer, mtls, flags("DENY"))...)),
					log: map[string]string{"response_flags": "DENY", "reason": "deny (deny_matched default/deny-prod)", "error": absent}}
			},
		},
		{
			name: "ALLOW policy that does not match: 401 and DENY",
			config: withPolicy("allow-9001", config.ActionAllow, config.Match{
				DestinationPorts: []uint16{9001}}),
			dst: func(b *bed) netip.AddrPort { return b.ap(12, 9000) },
			app: true,
			want: func(b *bed) outcome {
				return outcome{status: 401, metrics: failedOnly(lbl("destination", l(srcRemote, dstServer, mtls, flags("DENY"))...)),
					log: map[string]string{"response_flags": "DENY", "reason": "deny (no_allow_matched)"}}
			},
		},
		{
			name: "authority that is not the pod's address: 400 and CONNECT",
			dst:  func(b *bed) netip.AddrPort { return b.ap(11, 9000) },
			want: func(b *bed) outcome {
				return outcome{status: 400, metrics: failedOnly(lbl("destination", l(srcRemote, mtls, flags("CONNECT"))...)),
					log: map[string]string{"response_flags": "CONNECT", "dst.addr": b.ap(11, 9000).String(), "dst.workload": "",
						"error": "authority " + b.ap(11, 9000).String() + " is not an address of default/server-7d9f (server)"}}
			},
		},
		{
			name: "app not listening: 503 and CONNECT",
			dst:  func(b *bed) netip.AddrPort { return b.ap(12, 9000) },
			want: func(b *bed) outcome {
				return outcome{status: 503, metrics: failedOnly(lbl("destination", l(srcRemote, dstServer, mtls, flags("CONNECT"))...)),
					log: map[string]string{"response_flags": "CONNECT", "error": "dial " + b.ap(12, 9000).String() + ": ...connection refused"}}
			},
		},
		{
			name: "client resets the stream mid-relay: CONNECT on close",
			dst:  func(b *bed) netip.AddrPort { return b.ap(12, 9000) },
			app:  true,
			client: func(t *testing.T, b *bed, s *hbone.Stream) {
				echoOnce(t, s, "abc")
				s.Abort()
			},
			want: func(b *bed) outcome {
				open := lbl("destination", l(srcRemote, dstServer, mtls)...)
				closed := lbl("destination", l(srcRemote, dstServer, mtls, flags("CONNECT"))...)
				return outcome{status: 200,
					metrics: map[string]series{
						"connections_opened_total": {open: 1},
						"connections_closed_total": {closed: 1},
						"connections_failed_total": {closed: 1},
						"received_bytes_total":     {open: 3},
						"sent_bytes_total":         {open: 3},
					},
					log: map[string]string{"response_flags": "CONNECT", "error": errRelayAborted.Error(), "bytes_received": "3", "bytes_sent": "3"}}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBed(t, bedOpts{config: tt.config})
			dst := tt.dst(b)
			if tt.app {
				b.echoApp(dst, false)
			}
			from := b.ip(30)
			if tt.from != nil {
				from = tt.from(b)
			}
			var hdr map[string]string
			if tt.hdr != nil {
				hdr = tt.hdr(b)
			}
			want := tt.want(b)
			s, err := b.tunnelFrom(from, dst, hdr)
			var se *hbone.StatusError
			switch {
			case want.status == 200 && err != nil:
				t.Fatalf("CONNECT: %v, want 200", err)
			case want.status != 200 && (!errors.As(err, &se) || se.Code != want.status):
				t.Fatalf("CONNECT: %v, want status %d", err, want.status)
			case want.status == 200 && tt.client != nil:
				tt.client(t, b, s)
			case want.status == 200:
				exchange(t, s, "ping")
			}
			checkLog(t, b.logs.next(t), want.log)
			waitFor(t, "no connection is tracked", func() bool { return b.openConns() == 0 })
			b.checkMetrics(want.metrics)
			b.logs.none(t)
		})
	}
}

// TestPlaintextInbound runs every outcome of the plaintext handler: a
// connect from outside the mesh that sk_lookup steered to the server pod's
// 15006 listener (here: a connect to that listener from another address).
func TestPlaintextInbound(t *testing.T) {
	srcLegacy := []string{"source_workload", "legacy", "source_workload_namespace", "legacy"}
	tests := []struct {
		name   string
		config func(*config.Config)
		from   byte // last byte of the client's address
		app    bool
		want   func(b *bed) (map[string]series, map[string]string)
	}{
		{
			name: "PERMISSIVE: relayed, the source workload known by its address",
			from: 13,
			app:  true,
			want: func(b *bed) (map[string]series, map[string]string) {
				return through(lbl("destination", l(srcLegacy, dstServer, plain)...), 1, 5, 5),
					map[string]string{"direction": "inbound_plaintext", "reporter": "destination", "src.addr": b.ip(13).String() + ":...",
						"src.workload": "legacy", "src.namespace": "legacy", "src.identity": "", "dst.addr": b.plainDst().String(),
						"dst.workload": "server", "dst.identity": serverID, "security": "unknown", "bytes_received": "5", "bytes_sent": "5",
						"response_flags": absent, "error": absent, "reason": absent}
			},
		},
		{
			name: "from an address the mesh does not know",
			from: 50,
			app:  true,
			want: func(b *bed) (map[string]series, map[string]string) {
				return through(lbl("destination", l(dstServer, plain)...), 1, 5, 5),
					map[string]string{"src.workload": "", "src.namespace": "", "src.addr": b.ip(50).String() + ":..."}
			},
		},
		{
			name:   "STRICT: refused, DENY",
			config: func(c *config.Config) { workload(c, "server").MTLSMode = config.MTLSStrict },
			from:   13,
			app:    true,
			want: func(b *bed) (map[string]series, map[string]string) {
				return failedOnly(lbl("destination", l(srcLegacy, dstServer, plain, flags("DENY"))...)),
					map[string]string{"response_flags": "DENY", "error": errStrict.Error()}
			},
		},
		{
			name: "STRICT by the namespace's peer authentication: refused, DENY",
			config: func(c *config.Config) {
				c.PeerAuthentications = []*config.PeerAuthentication{{Name: "strict", Namespace: "default", Scope: config.ScopeNamespace, Mode: config.MTLSStrict}}
			},
			from: 50,
			app:  true,
			want: func(b *bed) (map[string]series, map[string]string) {
				return failedOnly(lbl("destination", l(dstServer, plain, flags("DENY"))...)),
					map[string]string{"response_flags": "DENY", "error": errStrict.Error()}
			},
		},
		{
			name:   "policy denies the source address: DENY",
			config: withPolicy("deny-outside", config.ActionDeny, config.Match{SourceIPs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}),
			from:   50,
			app:    true,
			want: func(b *bed) (map[string]series, map[string]string) {
				return failedOnly(lbl("destination", l(dstServer, plain, flags("DENY"))...)),
					map[string]string{"response_flags": "DENY", "reason": "deny (deny_matched default/deny-outside)", "error": absent}
			},
		},
		{
			name: "app not listening: CONNECT",
			from: 50,
			want: func(b *bed) (map[string]series, map[string]string) {
				return failedOnly(lbl("destination", l(dstServer, plain, flags("CONNECT"))...)),
					map[string]string{"response_flags": "CONNECT", "error": "dial " + b.plainDst().String() + ": ...connection refused"}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBed(t, bedOpts{config: tt.config})
			if tt.app {
				b.echoApp(b.plainDst(), false)
			}
			metrics, log := tt.want(b)
			c := b.dialPlaintext(b.ip(tt.from))
			if _, ok := log["response_flags"]; ok && log["response_flags"] != absent {
				refused(t, c)
			} else {
				exchange(t, c, "hello")
			}
			checkLog(t, b.logs.next(t), log)
			waitFor(t, "no connection is tracked", func() bool { return b.openConns() == 0 })
			b.checkMetrics(metrics)
			b.logs.none(t)
		})
	}
}

// TestPlaintextUnknownWorkload: a connect that reaches a pod the current
// configuration no longer has (its removal under way) is reset, unaccounted.
func TestPlaintextUnknownWorkload(t *testing.T) {
	b := newBed(t, bedOpts{noRun: true})
	snap := b.publish(nil)
	w, _ := snap.WorkloadByUID("server")
	b.p.addWorkload(context.Background(), w)
	b.echoApp(b.plainDst(), false)
	b.publish(without("server")) // Run would remove the pod; nobody does
	c := b.dialPlaintext(b.ip(50))
	refused(t, c)
	b.p.wg.Wait() // the handler returned
	b.logs.none(t)
	b.checkMetrics(nil)
}
