package balance

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/warren-mesh/warren/pkg/config"
)

var key = config.NamespacedHostname{Namespace: "default", Hostname: "echo"}

type ep struct {
	name     string
	capacity uint32
	status   config.HealthStatus
	loc      config.Locality
	ips      []string
	port     uint16 // workload target port for 80 (0: the service's)
	node     string
	cluster  string
}

func snapshot(t testing.TB, svcPorts config.PortMap, eps ...ep) (*config.Snapshot, *config.Service) {
	t.Helper()
	return snapshotLB(t, nil, svcPorts, eps...)
}

func snapshotLB(t testing.TB, lb *config.LoadBalancing, svcPorts config.PortMap, eps ...ep) (*config.Snapshot, *config.Service) {
	t.Helper()
	svc := &config.Service{Name: "echo", Namespace: "default", Hostname: "echo", Ports: svcPorts, LoadBalancing: lb,
		VIPs: []config.NetworkAddress{{Addr: netip.MustParseAddr("198.18.100.1")}}}
	var ws []*config.Workload
	for i, e := range eps {
		ips := e.ips
		if ips == nil {
			ips = []string{fmt.Sprintf("198.18.1.%d", i+1)}
		}
		var addrs []netip.Addr
		for _, s := range ips {
			addrs = append(addrs, netip.MustParseAddr(s))
		}
		ws = append(ws, workload(&config.Workload{UID: e.name, Name: e.name, Namespace: "default", WorkloadIPs: addrs,
			Capacity: e.capacity, Status: e.status, Node: e.node,
			Services: map[config.NamespacedHostname]config.PortMap{key: {80: e.port}}}, e.cluster, e.loc))
	}
	s, err := config.NewSnapshot(config.Config{Workloads: ws, Services: []*config.Service{svc}}, config.Options{})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := s.ServiceByKey(key)
	return s, got
}

var vip = netip.MustParseAddrPort("198.18.100.1:80")

func counts(t *testing.T, p *Picker, s *config.Snapshot, svc *config.Service, from *config.Workload, n int) map[string]int {
	t.Helper()
	out := map[string]int{}
	for range n {
		c, err := p.Pick(s, svc, vip, from)
		if err != nil {
			t.Fatal(err)
		}
		out[c.Workload().Name]++
	}
	return out
}

// checkOnly fails unless the picks in got are exactly the endpoints only,
// each at least once.
func checkOnly(t *testing.T, got map[string]int, only []string) {
	t.Helper()
	allowed := map[string]bool{}
	for _, n := range only {
		allowed[n] = true
		if got[n] == 0 {
			t.Errorf("%s never picked: %v", n, got)
		}
	}
	for n := range got {
		if !allowed[n] {
			t.Errorf("%s picked %d times, want only %v", n, got[n], only)
		}
	}
}

// TestCanarySplit is the acceptance check: capacities 90/5/5 over
// 3,000 picks land within ±3 points of 90/5/5, and an unhealthy endpoint
// (with the largest capacity) receives nothing. Several seeds guard against
// a lucky one.
func TestCanarySplit(t *testing.T) {
	s, svc := snapshot(t, config.PortMap{80: 8080},
		ep{name: "stable", capacity: 90},
		ep{name: "canary-a", capacity: 5},
		ep{name: "canary-b", capacity: 5},
		ep{name: "sick", capacity: 1000, status: config.Unhealthy},
	)
	want := map[string]float64{"stable": 90, "canary-a": 5, "canary-b": 5}
	for seed := range uint64(5) {
		p := New(rand.New(rand.NewPCG(seed, 0x5eed)))
		got := counts(t, p, s, svc, &config.Workload{}, 3000)
		if got["sick"] != 0 {
			t.Errorf("seed %d: unhealthy endpoint got %d picks", seed, got["sick"])
		}
		for name, pct := range want {
			share := 100 * float64(got[name]) / 3000
			if share < pct-3 || share > pct+3 {
				t.Errorf("seed %d: %s got %.1f%%, want %.0f±3", seed, name, share, pct)
			}
		}
		t.Logf("seed %d: %v", seed, got)
	}
}

func TestLocality(t *testing.T) {
	euA1 := config.Locality{Region: "eu", Zone: "a", Subzone: "1"}
	euA2 := config.Locality{Region: "eu", Zone: "a", Subzone: "2"}
	euB := config.Locality{Region: "eu", Zone: "b"}
	us := config.Locality{Region: "us", Zone: "a", Subzone: "1"}
	cases := []struct {
		name string
		from config.Locality
		eps  []ep
		only []string // the set of endpoints that may be picked
	}{
		{"same subzone wins", euA1, []ep{{name: "sub", capacity: 1, loc: euA1}, {name: "zone", capacity: 100, loc: euA2}, {name: "far", capacity: 100, loc: us}}, []string{"sub"}},
		{"same zone beats region", euA1, []ep{{name: "zone", capacity: 1, loc: euA2}, {name: "region", capacity: 100, loc: euB}}, []string{"zone"}},
		{"same region beats other", euA1, []ep{{name: "region", capacity: 1, loc: euB}, {name: "far", capacity: 100, loc: us}}, []string{"region"}},
		{"failover when local unhealthy", euA1, []ep{{name: "sub", capacity: 1, loc: euA1, status: config.Unhealthy}, {name: "zone", capacity: 1, loc: euA2}, {name: "far", capacity: 1, loc: us}}, []string{"zone"}},
		{"failover when local drained", euA1, []ep{{name: "sub", capacity: 0, loc: euA1}, {name: "far", capacity: 1, loc: us}}, []string{"far"}},
		{"failover to another region", euA1, []ep{{name: "sub", capacity: 1, loc: euA1, status: config.Unhealthy}, {name: "far", capacity: 1, loc: us}}, []string{"far"}},
		{"no client locality: no preference", config.Locality{}, []ep{{name: "x", capacity: 1, loc: euA1}, {name: "y", capacity: 1, loc: us}}, []string{"x", "y"}},
		{"subzone matters only within zone", config.Locality{Region: "eu", Zone: "b", Subzone: "1"}, []ep{{name: "a1", capacity: 1, loc: euA1}, {name: "b", capacity: 1, loc: euB}}, []string{"b"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, svc := snapshot(t, config.PortMap{80: 8080}, tc.eps...)
			got := counts(t, New(rand.New(rand.NewPCG(1, 2))), s, svc, workload(&config.Workload{}, "", tc.from), 400)
			checkOnly(t, got, tc.only)
		})
	}
}

// TestLoadBalancing checks istiod's load-balancing settings as ztunnel
// applies them: Strict never falls back, Failover ranks by the longest
// shared prefix of the routing preference, Standard ignores it, and
// AllowUnhealthy lets unhealthy endpoints in.
func TestLoadBalancing(t *testing.T) {
	euA := config.Locality{Region: "eu", Zone: "a"}
	euB := config.Locality{Region: "eu", Zone: "b"}
	us := config.Locality{Region: "us", Zone: "a"}
	from := workload(&config.Workload{Node: "n1"}, "c1", euA)
	strictNode := &config.LoadBalancing{Mode: config.LBStrict, RoutingPreference: []config.LBScope{config.ScopeNode}}
	failover := &config.LoadBalancing{Mode: config.LBFailover, RoutingPreference: []config.LBScope{config.ScopeCluster, config.ScopeRegion, config.ScopeZone}}
	cases := []struct {
		name string
		lb   *config.LoadBalancing
		from *config.Workload
		eps  []ep
		only []string // nil: the pick must fail with ErrNoHealthyEndpoint
	}{
		{"strict node: local only", strictNode, from, []ep{{name: "local", capacity: 1, node: "n1"}, {name: "remote", capacity: 100, node: "n2"}}, []string{"local"}},
		{"strict node: no fallback", strictNode, from, []ep{{name: "remote", capacity: 1, node: "n2"}, {name: "local-sick", capacity: 1, node: "n1", status: config.Unhealthy}}, nil},
		{"strict without a client", strictNode, nil, []ep{{name: "local", capacity: 1, node: "n1"}}, nil},
		{"strict, empty preference: any", &config.LoadBalancing{Mode: config.LBStrict}, from, []ep{{name: "x", capacity: 1, node: "n2"}, {name: "y", capacity: 1, node: "n3"}}, []string{"x", "y"}},
		{"failover: cluster then region then zone", failover, from, []ep{{name: "zone", capacity: 1, cluster: "c1", loc: euA}, {name: "region", capacity: 50, cluster: "c1", loc: euB}, {name: "other-cluster", capacity: 50, cluster: "c2", loc: euA}}, []string{"zone"}},
		{"failover: prefix, not count", failover, from, []ep{{name: "region", capacity: 1, cluster: "c1", loc: euB}, {name: "other-cluster-same-zone", capacity: 50, cluster: "c2", loc: euA}}, []string{"region"}},
		{"failover: down to anything", failover, from, []ep{{name: "far", capacity: 1, cluster: "c2", loc: us}}, []string{"far"}},
		{"standard ignores locality", &config.LoadBalancing{Mode: config.LBStandard, RoutingPreference: []config.LBScope{config.ScopeZone}}, from, []ep{{name: "near", capacity: 1, loc: euA}, {name: "far", capacity: 1, loc: us}}, []string{"near", "far"}},
		{"only healthy by default", &config.LoadBalancing{}, from, []ep{{name: "sick", capacity: 1, status: config.Unhealthy}}, nil},
		{"allow all health", &config.LoadBalancing{AllowUnhealthy: true}, from, []ep{{name: "sick", capacity: 1, status: config.Unhealthy}, {name: "well", capacity: 1}}, []string{"sick", "well"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, svc := snapshotLB(t, tc.lb, config.PortMap{80: 8080}, tc.eps...)
			p := New(rand.New(rand.NewPCG(3, 4)))
			if tc.only == nil {
				if c, err := p.Pick(s, svc, vip, tc.from); !errors.Is(err, ErrNoHealthyEndpoint) {
					t.Fatalf("picked %v, err %v; want ErrNoHealthyEndpoint", c.Workload(), err)
				}
				return
			}
			got := counts(t, p, s, svc, tc.from, 400)
			checkOnly(t, got, tc.only)
		})
	}
}

func TestNoHealthyEndpoint(t *testing.T) {
	cases := []struct {
		name      string
		svcPorts  config.PortMap
		eps       []ep
		unhealthy int
	}{
		{"no endpoints", config.PortMap{80: 8080}, nil, 0},
		{"all unhealthy", config.PortMap{80: 8080}, []ep{{name: "a", capacity: 1, status: config.Unhealthy}, {name: "b", capacity: 1, status: config.Unhealthy}}, 2},
		{"all drained", config.PortMap{80: 8080}, []ep{{name: "a", capacity: 0}}, 0},
		{"no target port", config.PortMap{80: 0}, []ep{{name: "a", capacity: 1}}, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, svc := snapshot(t, tc.svcPorts, tc.eps...)
			_, err := New(nil).Pick(s, svc, vip, &config.Workload{})
			if !errors.Is(err, ErrNoHealthyEndpoint) {
				t.Fatalf("err = %v, want ErrNoHealthyEndpoint", err)
			}
			var nh *NoHealthyEndpointError
			if !errors.As(err, &nh) || nh.Service != key || nh.Port != 80 || nh.Endpoints != len(tc.eps) || nh.Unhealthy != tc.unhealthy {
				t.Errorf("error detail = %+v", nh)
			}
		})
	}
}

func TestChoiceAddress(t *testing.T) {
	s, svc := snapshot(t, config.PortMap{80: 8080, 443: 0},
		ep{name: "dual", capacity: 1, ips: []string{"198.18.1.5", "2001:2::5"}, port: 9090})
	p := New(nil)
	c, err := p.Pick(s, svc, vip, &config.Workload{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr != netip.MustParseAddrPort("198.18.1.5:9090") {
		t.Errorf("v4 VIP: addr %s (workload port overrides service port)", c.Addr)
	}
	c, err = p.Pick(s, svc, netip.MustParseAddrPort("[2001:2:0:100::1]:80"), &config.Workload{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr != netip.MustParseAddrPort("[2001:2::5]:9090") {
		t.Errorf("v6 VIP: addr %s", c.Addr)
	}
}

func BenchmarkPick(b *testing.B) {
	var eps []ep
	for i := range 50 {
		eps = append(eps, ep{name: fmt.Sprint("e", i), capacity: uint32(i%5 + 1), loc: config.Locality{Region: "eu", Zone: fmt.Sprint(i % 3)}})
	}
	s, svc := snapshot(b, config.PortMap{80: 8080}, eps...)
	p := New(nil)
	from := workload(&config.Workload{}, "", config.Locality{Region: "eu", Zone: "1"})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.Pick(s, svc, vip, from); err != nil {
			b.Fatal(err)
		}
	}
}

// workload sets w's cluster and locality (not fields: see config.Workload) and returns w.
func workload(w *config.Workload, cluster string, l config.Locality) *config.Workload {
	w.SetMeta(config.WorkloadMeta{ClusterID: cluster})
	w.SetLocality(l)
	return w
}
