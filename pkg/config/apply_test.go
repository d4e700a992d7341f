package config

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestApplyRejectsAlone(t *testing.T) {
	opts := Options{Node: "node-a", CheckNetns: okPath, CheckCgroup: okPath}
	base, err := NewSnapshot(validConfig(), opts)
	if err != nil {
		t.Fatal(err)
	}
	good := &Workload{UID: "new", Name: "new", Namespace: "default", Node: "node-c", WorkloadIPs: addrs("198.18.9.9")}
	cases := []struct {
		name string
		d    Delta
		want string // in the one rejection; "" for none
	}{
		{"duplicate ip", Delta{Workloads: []*Workload{{UID: "x", Name: "x", Namespace: "n", WorkloadIPs: addrs("198.18.1.2")}}},
			`duplicate IP 198.18.1.2 (network "") also used by workload "c//v1/Pod/default/b"`},
		{"ip is a vip", Delta{Workloads: []*Workload{{UID: "x", Name: "x", Namespace: "n", WorkloadIPs: addrs("198.18.100.1")}}},
			`is a VIP of service`},
		{"invalid ip", Delta{Workloads: []*Workload{{UID: "x", Name: "x", Namespace: "n", WorkloadIPs: []netip.Addr{{}}}}},
			`workloadIps[0]: invalid address`},
		{"unknown service", Delta{Workloads: []*Workload{{UID: "x", Name: "x", Namespace: "n", WorkloadIPs: addrs("198.18.9.1"),
			Services: map[NamespacedHostname]PortMap{{Namespace: "n", Hostname: "nope"}: nil}}}}, `service n/nope is not defined`},
		{"bad protocol", Delta{Workloads: []*Workload{{UID: "x", Name: "x", Namespace: "n", WorkloadIPs: addrs("198.18.9.1"), Protocol: "UDP"}}},
			`protocol: unknown value "UDP"`},
		{"local without netns", Delta{Workloads: []*Workload{{UID: "x", Name: "x", Namespace: "n", Node: "node-a", Protocol: ProtocolHBONE, WorkloadIPs: addrs("198.18.9.1")}}},
			`netnsPath is required`},
		{"shared netns", Delta{Workloads: []*Workload{{UID: "x", Name: "x", Namespace: "n", Node: "node-a", Protocol: ProtocolHBONE, WorkloadIPs: addrs("198.18.9.1"), Paths: &LocalPaths{NetnsPath: "/run/netns/b"}}}},
			`also used by workload "c//v1/Pod/default/b"`},
		{"vip taken", Delta{Services: []*Service{{Name: "s", Namespace: "n", Hostname: "s", Ports: PortMap{1: 1},
			VIPs: []NetworkAddress{{Addr: netip.MustParseAddr("198.18.100.1")}}}}}, `is also a VIP of service`},
		{"vip is a workload ip", Delta{Services: []*Service{{Name: "s", Namespace: "n", Hostname: "s", Ports: PortMap{1: 1},
			VIPs: []NetworkAddress{{Addr: netip.MustParseAddr("198.18.1.2")}}}}}, `is also an IP of workload`},
		{"service still backed", Delta{RemovedServices: []NamespacedHostname{svcKey}}, `2 workloads still back it`},
		{"policy still listed", Delta{RemovedPolicies: []string{"default/sel"}}, `1 workloads still list it`},
		{"policy scope while listed", Delta{Policies: []*AuthorizationPolicy{{Name: "sel", Namespace: "default", Scope: ScopeNamespace, Action: ActionAllow}}},
			`workloads list it as a WorkloadSelector policy`},
		{"bad action", Delta{Policies: []*AuthorizationPolicy{{Name: "p", Namespace: "n", Scope: ScopeGlobal, Action: "Audit"}}},
			`action: unknown value "Audit"`},
		{"two global modes", Delta{SetPeerAuthentications: true, PeerAuthentications: []*PeerAuthentication{
			{Name: "a", Scope: ScopeGlobal, Mode: MTLSStrict}, {Name: "b", Scope: ScopeGlobal, Mode: MTLSStrict}}}, `a second Global`},
		{"rejected item claims no netns", Delta{Workloads: []*Workload{
			{UID: "x", Name: "x", Namespace: "n", Node: "node-a", Protocol: "UDP", WorkloadIPs: addrs("198.18.9.1"), Paths: &LocalPaths{NetnsPath: "/run/netns/y"}},
			{UID: "y", Name: "y", Namespace: "n", Node: "node-a", Protocol: ProtocolHBONE, WorkloadIPs: addrs("198.18.9.2"), Paths: &LocalPaths{NetnsPath: "/run/netns/y"}}}},
			`protocol: unknown value "UDP"`},
		{"move ip in order", Delta{RemovedWorkloads: []string{"c//v1/Pod/secure/c"},
			Workloads: []*Workload{{UID: "x", Name: "x", Namespace: "n", WorkloadIPs: addrs("198.18.2.1")}}}, ""},
		{"remove service with its workloads", Delta{RemovedWorkloads: []string{"c//v1/Pod/default/a", "c//v1/Pod/default/b"},
			RemovedServices: []NamespacedHostname{svcKey}}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := tc.d
			d.Workloads = append(slices.Clone(d.Workloads), good) // the good one lands whatever the others do
			next, rejected := base.Apply(d)
			if tc.want == "" {
				if len(rejected) > 0 {
					t.Fatalf("rejected %v", rejected)
				}
			} else if len(rejected) != 1 || !strings.Contains(rejected[0].Error(), tc.want) {
				t.Fatalf("rejected %v, want one containing %q", rejected, tc.want)
			}
			if w, ok := next.WorkloadByIP("", netip.MustParseAddr("198.18.9.9")); !ok || w.UID != "new" {
				t.Errorf("the valid workload of the delta was not applied")
			}
			if len(base.Workloads()) != 4 {
				t.Errorf("Apply changed its receiver")
			}
		})
	}
}

func TestApplyMatchesNewSnapshot(t *testing.T) {
	opts := Options{Node: "node-0", CheckNetns: okPath, CheckCgroup: okPath}
	rng := rand.New(rand.NewPCG(1, 2))
	const nw, ns = 300, 20
	svcs := map[NamespacedHostname]*Service{}
	pols := map[string]*AuthorizationPolicy{}
	wls := map[string]*Workload{}
	for i := range ns {
		svc := &Service{Name: fmt.Sprint("s", i), Namespace: "n", Hostname: fmt.Sprint("s", i), Ports: PortMap{80: uint16(8000 + i)},
			VIPs: []NetworkAddress{{Addr: netip.AddrFrom4([4]byte{10, 96, 0, byte(i)})}}}
		svcs[svc.Key()] = svc
	}
	for i, sc := range []Scope{ScopeGlobal, ScopeNamespace, ScopeWorkloadSelector, ScopeWorkloadSelector} {
		p := &AuthorizationPolicy{Name: fmt.Sprint("p", i), Namespace: "n", Scope: sc, Action: ActionAllow}
		pols[p.Key()] = p
	}
	mkWorkload := func(i, gen int) *Workload {
		w := &Workload{UID: fmt.Sprint("w", i), Name: fmt.Sprint("w", i), Namespace: []string{"n", "m"}[i%2],
			Node: fmt.Sprint("node-", rng.IntN(4)), ServiceAccount: fmt.Sprint("sa", gen%3),
			WorkloadIPs: addrs(fmt.Sprintf("10.0.%d.%d", i/200, i%200), fmt.Sprintf("fd00::%x:%x", gen, i)),
			Services:    map[NamespacedHostname]PortMap{{Namespace: "n", Hostname: fmt.Sprint("s", rng.IntN(ns))}: nil},
		}
		if w.Node == "node-0" {
			w.Protocol = ProtocolHBONE
			w.SetNetnsPath("/run/netns/" + w.UID)
		}
		if rng.IntN(3) == 0 {
			w.AuthorizationPolicies = []string{fmt.Sprint("n/p", 2+rng.IntN(2))}
		}
		return w
	}
	for i := range nw {
		wls[fmt.Sprint("w", i)] = mkWorkload(i, 0)
	}
	config := func() Config {
		var c Config
		for _, k := range slices.SortedFunc(maps.Keys(svcs), func(a, b NamespacedHostname) int { return strings.Compare(a.String(), b.String()) }) {
			c.Services = append(c.Services, svcs[k])
		}
		for _, k := range slices.Sorted(maps.Keys(pols)) {
			c.Policies = append(c.Policies, pols[k])
		}
		for _, k := range slices.Sorted(maps.Keys(wls)) {
			c.Workloads = append(c.Workloads, wls[k])
		}
		return c
	}
	cur, err := NewSnapshot(config(), opts)
	if err != nil {
		t.Fatal(err)
	}
	for gen := 1; gen <= 50; gen++ {
		var d Delta
		picked := map[int]bool{} // an item once per delta: Apply's order is not the order of the list
		for range 10 {
			i := rng.IntN(nw + 20)
			if picked[i] {
				continue
			}
			picked[i] = true
			uid := fmt.Sprint("w", i)
			if _, ok := wls[uid]; ok && rng.IntN(4) == 0 {
				delete(wls, uid)
				d.RemovedWorkloads = append(d.RemovedWorkloads, uid)
				continue
			}
			w := mkWorkload(i, gen)
			wls[uid] = w
			d.Workloads = append(d.Workloads, w)
		}
		if gen%10 == 0 { // a service changes its port; a global policy is added
			k := NamespacedHostname{Namespace: "n", Hostname: "s1"}
			c := *svcs[k]
			c.Ports = PortMap{80: uint16(9000 + gen)}
			svcs[k] = &c
			p := &AuthorizationPolicy{Name: fmt.Sprint("g", gen), Namespace: "n", Scope: ScopeGlobal, Action: ActionDeny}
			pols[p.Key()] = p
			d.Services, d.Policies = append(d.Services, &c), append(d.Policies, p)
		}
		next, rejected := cur.Apply(d)
		if len(rejected) > 0 {
			t.Fatalf("gen %d: rejected %v", gen, rejected)
		}
		want, err := NewSnapshot(config(), opts)
		if err != nil {
			t.Fatal(err)
		}
		sameView(t, fmt.Sprint("gen ", gen), next, want)
		changed := 0
		ChangedWorkloads(cur, next, func(_, _ *Workload) { changed++ })
		if changed == 0 || changed > 10 {
			t.Errorf("gen %d: ChangedWorkloads saw %d changes for a delta of 10", gen, changed)
		}
		cur = next
	}
}

// sameView compares everything a reader can see, except policy order
// (Apply appends new policies where NewSnapshot keeps input order).
func sameView(t *testing.T, at string, got, want *Snapshot) {
	t.Helper()
	if !reflect.DeepEqual(got.Workloads(), want.Workloads()) {
		t.Fatalf("%s: workloads differ", at)
	}
	if !reflect.DeepEqual(got.Services(), want.Services()) {
		t.Fatalf("%s: services differ", at)
	}
	for _, svc := range want.Services() {
		if !reflect.DeepEqual(got.Endpoints(svc), want.Endpoints(svc)) {
			t.Fatalf("%s: endpoints of %s differ:\n%v\n%v", at, svc.Key(), got.Endpoints(svc), want.Endpoints(svc))
		}
		for _, vip := range svc.VIPs {
			if s, ok := got.ServiceByAddr(vip.Network, vip.Addr); !ok || s.Key() != svc.Key() {
				t.Fatalf("%s: VIP %s", at, vip)
			}
		}
	}
	for _, node := range []string{"node-0", "node-1", "node-2", "node-3"} {
		if !reflect.DeepEqual(got.WorkloadsOnNode(node), want.WorkloadsOnNode(node)) {
			t.Fatalf("%s: workloads on %s differ", at, node)
		}
	}
	if !reflect.DeepEqual(got.EnrolledWorkloads(), want.EnrolledWorkloads()) {
		t.Fatalf("%s: enrolled differ", at)
	}
	for _, w := range want.Workloads() {
		for _, ip := range w.WorkloadIPs {
			if g, ok := got.WorkloadByIP(w.Network, ip); !ok || g.UID != w.UID {
				t.Fatalf("%s: WorkloadByIP(%s)", at, ip)
			}
		}
		key := func(ps []*AuthorizationPolicy) []string {
			var out []string
			for _, p := range ps {
				out = append(out, p.Key())
			}
			slices.Sort(out)
			return out
		}
		if g, w := key(got.PoliciesFor(w)), key(want.PoliciesFor(w)); !slices.Equal(g, w) {
			t.Fatalf("%s: PoliciesFor(%s) = %v, want %v", at, w, g, w)
		}
	}
	if got.NumWorkloads() != len(want.Workloads()) {
		t.Fatalf("%s: NumWorkloads %d", at, got.NumWorkloads())
	}
}

func TestCompareKeys(t *testing.T) {
	keys := []NamespacedHostname{{"a", "x"}, {"a-b", "y"}, {"a", "w"}, {"ab", "a"}, {"a", "x"}}
	for _, x := range keys {
		for _, y := range keys {
			if got, want := compareKeys(x, y), strings.Compare(x.String(), y.String()); got != want {
				t.Errorf("compareKeys(%s, %s) = %d, want %d", x, y, got, want)
			}
		}
	}
}

// TestApplyBulk applies deltas past bulkWorkloads (the leaves sized for
// the whole delta first) to an empty and to a full snapshot, and compares
// each with NewSnapshot of the same configuration.
func TestApplyBulk(t *testing.T) {
	opts := Options{Node: "node-0", CheckNetns: okPath, CheckCgroup: okPath}
	svc := &Service{Name: "s", Namespace: "n", Hostname: "s", Ports: PortMap{80: 8080},
		VIPs: []NetworkAddress{{Addr: netip.AddrFrom4([4]byte{10, 96, 0, 1})}}}
	const n = 3 * bulkWorkloads
	gen := func(g int) []*Workload {
		ws := make([]*Workload, n)
		for i := range ws {
			ws[i] = &Workload{UID: fmt.Sprint("w", i), Name: fmt.Sprint("w", i), Namespace: "n", Node: fmt.Sprint("node-", 1+i%3),
				ServiceAccount: "sa", WorkloadIPs: addrs(fmt.Sprintf("10.%d.%d.%d", g, i/250, i%250), fmt.Sprintf("fd00::%x:%x", g, i)),
				Services: map[NamespacedHostname]PortMap{svc.Key(): nil}}
		}
		return ws
	}
	empty, err := NewSnapshot(Config{Services: []*Service{svc}}, opts)
	if err != nil {
		t.Fatal(err)
	}
	cur := empty
	for g := range 3 {
		ws := gen(g)
		next, rejected := cur.Apply(Delta{Workloads: ws})
		if len(rejected) > 0 {
			t.Fatalf("generation %d: %v", g, rejected[0])
		}
		want, err := NewSnapshot(Config{Services: []*Service{svc}, Workloads: gen(g)}, opts)
		if err != nil {
			t.Fatal(err)
		}
		sameView(t, fmt.Sprint("generation ", g), next, want)
		if next.NumWorkloads() != n {
			t.Fatalf("generation %d: %d workloads", g, next.NumWorkloads())
		}
		cur = next
	}
	if empty.NumWorkloads() != 0 {
		t.Fatal("Apply changed its parent")
	}
}
