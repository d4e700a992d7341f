package scale

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/warren-mesh/warren/pkg/config"
)

// Mesh sizes the synthetic mesh.
type Mesh struct {
	Workloads int
	Services  int
	Policies  int
	// Namespaces, ServiceAccounts (per namespace) and Nodes spread the
	// workloads (defaults 200, 20, 1000).
	Namespaces, ServiceAccounts, Nodes int
}

func (m *Mesh) defaults() {
	if m.Namespaces <= 0 {
		m.Namespaces = 200
	}
	if m.ServiceAccounts <= 0 {
		m.ServiceAccounts = 20
	}
	if m.Nodes <= 0 {
		m.Nodes = 1000
	}
	m.Services = max(m.Services, 1)
	m.Policies = max(m.Policies, 2)
}

// LocalNode is the agent's node: a workload in Nodes is local (with a
// network-namespace path), the others remote.
const LocalNode = "node-0"

// Full is the mesh of issue #18: 100,000 workloads, 20,000 services with
// 5 ports each, 5,000 authorization policies.
var Full = Mesh{Workloads: 100_000, Services: 20_000, Policies: 5_000}

// Short is the CI version, 1/20 of Full.
var Short = Mesh{Workloads: 5_000, Services: 1_000, Policies: 250}

// clone copies s, as a provider decoding it from the wire holds its own copy.
func clone(s string) string { return strings.Clone(s) }

// selectorPolicies is the number of WorkloadSelector policies: all but one
// Global and one Namespace policy per namespace (up to half the policies).
func (m *Mesh) selectorPolicies() int {
	return m.Policies - 1 - min(m.Namespaces, m.Policies/2)
}

// Workload returns slot i of the mesh at generation gen (a pod replaced or
// restarted gets a new generation; odd generations are restarts, which keep
// the pod's name and UID): half the slots are IPv4 only, half
// dual-stack; each backs one service; one in three lists a
// WorkloadSelector policy. The IPv4 address alternates between two ranges
// with the generation, so that a new generation moves to a free address.
func (m *Mesh) Workload(i int, gen uint32) *config.Workload {
	ns := fmt.Sprintf("ns-%d", i%m.Namespaces)
	app := fmt.Sprintf("app-%d", (i/m.Namespaces)%(m.Services/m.Namespaces+1))
	name := fmt.Sprintf("%s-%d-%d", app, i, gen/2) // an odd generation is a restart in place: same pod
	v4 := uint32(10)<<24 | (gen%2)<<17 | uint32(i)
	w := &config.Workload{
		UID:  "Kubernetes//Pod/" + ns + "/" + name,
		Name: name, Namespace: ns,
		TrustDomain:    clone("cluster.local"),
		ServiceAccount: fmt.Sprintf("sa-%d", i%m.ServiceAccounts),
		WorkloadIPs:    []netip.Addr{netip.AddrFrom4([4]byte{byte(v4 >> 24), byte(v4 >> 16), byte(v4 >> 8), byte(v4)})},
		Protocol:       config.ProtocolHBONE,
		Node:           fmt.Sprintf("node-%d", i%m.Nodes),
		Services:       map[config.NamespacedHostname]config.PortMap{m.serviceKey(i % m.Services): nil},
		Capacity:       1,
		Status:         config.Healthy,
	}
	w.SetMeta(config.WorkloadMeta{ClusterID: clone("Kubernetes"), WorkloadName: app, WorkloadType: clone("deployment"),
		CanonicalName: app, CanonicalRevision: clone("v1")})
	w.SetLocality(config.Locality{Region: clone("eu-west1"), Zone: fmt.Sprintf("eu-west1-%c", 'a'+i%3)})
	if w.Node == LocalNode {
		w.SetNetnsPath("/run/netns/" + name)
	}
	if i%2 == 1 {
		v6 := setLow([16]byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, byte(gen >> 24), byte(gen >> 16), byte(gen >> 8), byte(gen)}, i)
		w.WorkloadIPs = append(w.WorkloadIPs, netip.AddrFrom16(v6))
	}
	if sel := m.selectorPolicies(); i%3 == 0 && sel > 0 {
		w.AuthorizationPolicies = []string{m.selectorKey((i / 3) % sel)}
	}
	return w
}

func setLow(a [16]byte, i int) [16]byte {
	a[13], a[14], a[15] = byte(i>>16), byte(i>>8), byte(i)
	return a
}

func (m *Mesh) serviceKey(j int) config.NamespacedHostname {
	ns := fmt.Sprintf("ns-%d", j%m.Namespaces)
	return config.NamespacedHostname{Namespace: ns, Hostname: fmt.Sprintf("svc-%d.%s.svc.cluster.local", j, ns)}
}

func (m *Mesh) selectorKey(k int) string {
	return fmt.Sprintf("ns-%d/sel-%d", k%m.Namespaces, k)
}

// Service returns service j: 5 ports, an IPv4 VIP and, for odd j, an IPv6 one.
func (m *Mesh) Service(j int) *config.Service {
	key := m.serviceKey(j)
	svc := &config.Service{
		Name: fmt.Sprintf("svc-%d", j), Namespace: key.Namespace, Hostname: key.Hostname,
		VIPs:  []config.NetworkAddress{{Addr: netip.AddrFrom4([4]byte{172, 16 + byte(j>>16), byte(j >> 8), byte(j)})}},
		Ports: config.PortMap{80: 8080, 443: 8443, 8081: 8081, 9090: 9090, 15020: 15020},
	}
	if j%2 == 1 {
		svc.VIPs = append(svc.VIPs, config.NetworkAddress{Addr: netip.AddrFrom16(setLow([16]byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x96}, j))})
	}
	return svc
}

// Policy returns policy k: one Global policy, one Namespace policy per
// namespace (at most half the policies), the rest WorkloadSelector ones;
// each allows one principal prefix on one port.
func (m *Mesh) Policy(k int) *config.AuthorizationPolicy {
	nsPolicies := min(m.Namespaces, m.Policies/2)
	rule := func(ns string) []config.Rule {
		return []config.Rule{{{{
			Principals:       []config.StringMatch{{Kind: config.MatchPrefix, Value: "cluster.local/ns/" + ns + "/"}},
			DestinationPorts: []uint16{8080},
		}}}}
	}
	switch {
	case k == 0:
		return &config.AuthorizationPolicy{Name: "deny-legacy", Namespace: "istio-system", Scope: config.ScopeGlobal, Action: config.ActionDeny,
			Rules: []config.Rule{{{{Namespaces: []config.StringMatch{{Kind: config.MatchExact, Value: "legacy"}}}}}}}
	case k <= nsPolicies:
		ns := fmt.Sprintf("ns-%d", k-1)
		return &config.AuthorizationPolicy{Name: "allow-ns", Namespace: ns, Scope: config.ScopeNamespace, Action: config.ActionAllow, Rules: rule(ns)}
	default:
		key := m.selectorKey(k - 1 - nsPolicies)
		ns, name, _ := strings.Cut(key, "/")
		return &config.AuthorizationPolicy{Name: name, Namespace: ns, Scope: config.ScopeWorkloadSelector, Action: config.ActionAllow, Rules: rule(ns)}
	}
}

// Config returns the whole mesh at generation 0.
func (m *Mesh) Config() config.Config {
	m.defaults()
	c := config.Config{
		Workloads: make([]*config.Workload, 0, m.Workloads),
		Services:  make([]*config.Service, 0, m.Services),
		Policies:  make([]*config.AuthorizationPolicy, 0, m.Policies),
	}
	for k := range m.Policies {
		c.Policies = append(c.Policies, m.Policy(k))
	}
	for j := range m.Services {
		c.Services = append(c.Services, m.Service(j))
	}
	for i := range m.Workloads {
		c.Workloads = append(c.Workloads, m.Workload(i, 0))
	}
	return c
}
