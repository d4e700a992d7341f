package ztunnel

import (
	"net/http"
	"net/netip"
	"testing"

	"github.com/warren-mesh/warren/pkg/balance"
	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
)

func TestClientAddr(t *testing.T) {
	remote := netip.MustParseAddrPort("[::ffff:198.19.1.11]:41000")
	tests := []struct {
		name   string
		header []string
		want   string
	}{
		{"no header: the tunnel's source", nil, "198.19.1.11:41000"},
		{"the client's port from the source agent", []string{`for="198.19.1.11:4000"`}, "198.19.1.11:4000"},
		{"another IP is ignored: authorization sees the tunnel's source", []string{`for="198.19.9.9:4000"`}, "198.19.1.11:41000"},
		{"several parameters", []string{`by=x;for="198.19.1.11:5000"`}, "198.19.1.11:5000"},
		{"garbage", []string{`for=garbage`}, "198.19.1.11:41000"},
	}
	for _, tt := range tests {
		req := &hbone.ServerRequest{RemoteAddr: remote, Headers: http.Header{}}
		for _, v := range tt.header {
			req.Headers.Add("Forwarded", v)
		}
		if got := clientAddr(req).String(); got != tt.want {
			t.Errorf("%s: clientAddr(%q) = %s, want %s", tt.name, tt.header, got, tt.want)
		}
	}
}

func TestNamespaceOf(t *testing.T) {
	for path, want := range map[string]string{"/ns/prod/sa/web": "prod", "/other": "", "": ""} {
		if got := namespaceOf(path); got != want {
			t.Errorf("namespaceOf(%q) = %q, want %q", path, got, want)
		}
	}
}

// firstRand always picks the first candidate.
type firstRand struct{}

func (firstRand) Uint64N(uint64) uint64 { return 0 }

func TestResolve(t *testing.T) {
	ip := netip.MustParseAddr
	cfg := config.Config{
		Workloads: []*config.Workload{
			{UID: "c", Name: "c", Namespace: "default", ServiceAccount: "c", WorkloadIPs: []netip.Addr{ip("198.19.1.11")}, Protocol: config.ProtocolHBONE, Node: "other"},
			{UID: "s", Name: "s", Namespace: "default", ServiceAccount: "s", WorkloadIPs: []netip.Addr{ip("198.19.2.11"), ip("2001:2:0:102::b")},
				Protocol: config.ProtocolHBONE, Node: "other", Capacity: 1, Services: map[config.NamespacedHostname]config.PortMap{{Namespace: "default", Hostname: "svc.default"}: {80: 8080}}},
		},
		Services: []*config.Service{{Name: "svc", Namespace: "default", Hostname: "svc.default",
			VIPs: []config.NetworkAddress{{Addr: ip("198.18.200.1")}}, Ports: config.PortMap{80: 8080}, SubjectAltNames: []string{"cluster.local/ns/default/sa/canary"}}},
	}
	snap, err := config.NewSnapshot(cfg, config.Options{Node: "here"})
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{deps: Deps{Balancer: balance.New(firstRand{})}}
	src, _ := snap.WorkloadByUID("c")
	tests := []struct {
		name     string
		orig     string
		wantAddr string
		wantDst  string
		wantSvc  bool
	}{
		{"service VIP to endpoint and target port", "198.18.200.1:80", "198.19.2.11:8080", "s", true},
		{"workload IP", "198.19.2.11:9000", "198.19.2.11:9000", "s", false},
		{"outside the mesh", "198.18.9.9:443", "198.18.9.9:443", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rt, err := p.resolve(snap, src, netip.MustParseAddrPort(tt.orig))
			if err != nil {
				t.Fatal(err)
			}
			if rt.addr.String() != tt.wantAddr {
				t.Errorf("addr %s, want %s", rt.addr, tt.wantAddr)
			}
			if (rt.dst == nil && tt.wantDst != "") || (rt.dst != nil && rt.dst.UID != tt.wantDst) {
				t.Errorf("dst %v, want %q", rt.dst, tt.wantDst)
			}
			if (rt.svc != nil) != tt.wantSvc {
				t.Errorf("svc %v, want %v", rt.svc, tt.wantSvc)
			}
			if rt.dst != nil {
				ids, err := expectedIDs(rt)
				if err != nil {
					t.Fatal(err)
				}
				want := 1
				if tt.wantSvc {
					want = 2 // the workload's identity and the service's SAN
				}
				if len(ids) != want {
					t.Errorf("expected identities %v, want %d", ids, want)
				}
			}
		})
	}
	// A port the service does not have is not the service's: plain passthrough.
	if rt, err := p.resolve(snap, src, netip.MustParseAddrPort("198.18.200.1:81")); err != nil || rt.svc != nil || rt.dst != nil {
		t.Errorf("VIP port the service lacks: route %+v, err %v; want passthrough", rt, err)
	}
}
