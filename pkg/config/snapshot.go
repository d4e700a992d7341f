package config

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// Options say how NewSnapshot checks a configuration on this node.
type Options struct {
	// Node is this node's name; workloads whose Node equals it are local and
	// need a network-namespace path. Empty: no workload is local.
	Node string
	// CheckNetns checks a local workload's netnsPath; nil means
	// CheckNetnsPath (the path must be a namespace file on nsfs). Tests may
	// inject a fake.
	CheckNetns func(path string) error
	// CheckCgroup checks a local workload's cgroupPath; nil means CheckCgroupPath.
	CheckCgroup func(path string) error
}

// loc names an item in errors; it is formatted only when one is reported,
// so that validating a mesh formats nothing per item.
type loc struct {
	list string // "workloads", "services", "policies"; singular for Apply's items
	i    int    // position in the list; -1 for Apply's items
	a, b string // uid; namespace and hostname or name
}

// String returns e.g. `workloads[2] (uid "x")`, `services[0] (ns/host)`,
// `workload "x"` or `policy ns/name`.
func (l loc) String() string {
	switch {
	case l.list == "workloads":
		return fmt.Sprintf("workloads[%d] (uid %q)", l.i, l.a)
	case l.list == "workload":
		return fmt.Sprintf("workload %q", l.a)
	case l.i >= 0:
		return fmt.Sprintf("%s[%d] (%s/%s)", l.list, l.i, l.a, l.b)
	}
	return l.list + " " + l.a + "/" + l.b
}

// maxErrors bounds how many problems one validation reports.
const maxErrors = 20

// Snapshot is an immutable, validated configuration. It is safe for
// concurrent use without locks; callers must not modify anything it
// returns.
//
// Its indexes are persistent maps (shardMap): a lookup indexes a root and
// a middle node by the key's hash and scans one leaf of n/4096 entries on
// average (37 for the 150,000 addresses of a 100,000-workload mesh: 91 ns
// by IP in BenchmarkWorkloadByIP), so lookups stay flat up to meshes of a
// few hundred thousand workloads. A snapshot derived with Apply
// shares every shard it does not change with its parent, so a delta of N
// workloads costs O(N) plus what it invalidates (the endpoint lists of the
// services those workloads back, the workload lists of their nodes), not
// O(mesh). The sorted lists of Workloads and Services are built on first
// use, once per snapshot.
type Snapshot struct {
	opts Options // Node, CheckNetns and CheckCgroup set

	policies  []*AuthorizationPolicy // input order; Apply appends new ones
	peerAuths []*PeerAuthentication

	byUID      shardMap[string, *Workload]
	byIP       ipIndex
	byNode     shardMap[string, []*Workload] // sorted by UID
	svcByKey   shardMap[NamespacedHostname, *Service]
	svcByVIP   shardMap[NetworkAddress, *Service]
	endpoints  shardMap[NamespacedHostname, []Endpoint] // sorted by workload UID
	policyKeys shardMap[string, *AuthorizationPolicy]
	// policyRefs counts the workloads that list each WorkloadSelector policy.
	policyRefs shardMap[string, int32]
	enrolled   []*Workload
	// global and byNS are the Global and Namespace-scoped policies in input
	// order; scoped holds, per namespace with policies, global+byNS[ns].
	global     []*AuthorizationPolicy
	scoped     map[string][]*AuthorizationPolicy
	mtlsGlobal MTLSMode
	mtlsByNS   map[string]MTLSMode

	lists   *lists
	svcMaps *serviceMaps // shared by the line of snapshots
}

// lists are the sorted lists of a snapshot, built on first use.
type lists struct {
	workloadsOnce, servicesOnce sync.Once
	workloads                   []*Workload
	services                    []*Service
}

// Empty returns a snapshot with no configuration for the given node.
func Empty(node string) *Snapshot {
	s, _ := NewSnapshot(Config{}, Options{Node: node}) // an empty Config has nothing to reject
	return s
}

func (o Options) withDefaults() Options {
	if o.CheckNetns == nil {
		o.CheckNetns = CheckNetnsPath
	}
	if o.CheckCgroup == nil {
		o.CheckCgroup = CheckCgroupPath
	}
	return o
}

// NewSnapshot validates c and indexes it. Defaults are applied to copies
// (protocol TCP, status Healthy, capacity as given), whose repeated strings
// (namespace, service account, trust domain, node...) are interned (see
// Intern); c's slices and maps are shared with the snapshot, so the caller
// must not modify them afterwards. The error joins every problem found (at
// most 20), each naming the item by its position and key, e.g.
// `workloads[2] (uid "x"): workloadIps[0]: ...`.
func NewSnapshot(c Config, opts Options) (*Snapshot, error) {
	v := &validator{}
	s := &Snapshot{opts: opts.withDefaults(), lists: &lists{}, svcMaps: &serviceMaps{}}
	s.thaw()

	for i, p := range c.Policies {
		where := loc{"policies", i, p.Namespace, p.Name}
		if p.Name == "" || p.Namespace == "" {
			v.addf("%s: name and namespace are required", where)
			continue
		}
		if _, dup := s.policyKeys.get(p.Key()); dup {
			v.addf("%s: duplicate policy %s", where, p.Key())
			continue
		}
		checkPolicy(v, where, p)
		s.policyKeys.set(p.Key(), p)
		s.policies = append(s.policies, p)
	}
	s.mtlsGlobal, s.mtlsByNS = checkPeerAuths(v, c.PeerAuthentications)
	s.peerAuths = c.PeerAuthentications

	for i, svc := range c.Services {
		where := loc{"services", i, svc.Namespace, svc.Hostname}
		if svc.Name == "" || svc.Namespace == "" || svc.Hostname == "" {
			v.addf("%s: name, namespace and hostname are required", where)
			continue
		}
		if prev, dup := s.svcByKey.get(svc.Key()); dup {
			v.addf("%s: duplicate service %s (also %s)", where, svc.Key(), prev.Name)
			continue
		}
		s.putService(s.checkService(v, where, svc))
	}

	s.reserveFor(c.Workloads)
	netnsOwner := map[string]string{}
	for i, in := range c.Workloads {
		where := loc{"workloads", i, in.UID, ""}
		if in.UID == "" {
			v.addf("%s: uid is required", where)
			continue
		}
		if _, dup := s.byUID.get(in.UID); dup {
			v.addf("%s: duplicate uid", where)
			continue
		}
		w := s.checkWorkload(v, where, in, netnsOwner)
		s.putWorkload(nil, w)
		if w.NetnsPath() != "" && s.isLocal(w) {
			netnsOwner[w.NetnsPath()] = w.UID
		}
	}

	if err := v.err(); err != nil {
		return nil, err
	}

	byNode := map[string][]*Workload{}
	eps := map[NamespacedHostname][]Endpoint{}
	s.byUID.all(func(_ string, w *Workload) bool {
		byNode[w.Node] = append(byNode[w.Node], w)
		for key, ports := range w.Services {
			svc, _ := s.svcByKey.get(key)
			eps[key] = append(eps[key], Endpoint{Workload: w, Ports: ports, Service: svc})
		}
		return true
	})
	// The lists grew by appending; the snapshot keeps them without the
	// spare capacity (a third of their bytes at 100,000 workloads).
	for node, ws := range byNode {
		slices.SortFunc(ws, byUIDOrder)
		s.byNode.set(node, slices.Clip(slices.Clone(ws)))
	}
	for key, es := range eps {
		slices.SortFunc(es, endpointOrder)
		s.endpoints.set(key, slices.Clip(slices.Clone(es)))
	}
	s.rescope()
	s.reenroll()
	s.freeze()
	return s, nil
}

// reserveFor prepares the by-UID and by-IP indexes of this (writable)
// snapshot for a bulk insert of ws (shardMap.reserve).
func (s *Snapshot) reserveFor(ws []*Workload) {
	s.byUID.reserve(func(yield func(string) bool) {
		for _, w := range ws {
			if !yield(w.UID) {
				return
			}
		}
	})
	s.byIP.def.reserve(func(yield func([16]byte) bool) {
		for _, w := range ws {
			for _, ip := range w.WorkloadIPs {
				if k, ok := compactIP(NetworkAddress{Network: w.Network, Addr: ip.Unmap()}); ok && !yield(k) {
					return
				}
			}
		}
	})
}

// compareKeys orders keys as their "namespace/hostname" strings, without
// building them. A namespace holds no '/'.
func compareKeys(a, b NamespacedHostname) int {
	x, y := a.Namespace, b.Namespace
	n := min(len(x), len(y))
	if c := strings.Compare(x[:n], y[:n]); c != 0 {
		return c
	}
	switch {
	case len(x) < len(y):
		return cmp.Compare('/', y[n])
	case len(x) > len(y):
		return cmp.Compare(x[n], '/')
	}
	return strings.Compare(a.Hostname, b.Hostname)
}

func byUIDOrder(a, b *Workload) int { return cmp.Compare(a.UID, b.UID) }

func endpointOrder(a, b Endpoint) int { return cmp.Compare(a.Workload.UID, b.Workload.UID) }

// thaw makes every index of a fresh copy writable.
func (s *Snapshot) thaw() {
	s.byUID = s.byUID.clone()
	s.byIP = s.byIP.clone()
	s.byNode = s.byNode.clone()
	s.svcByKey = s.svcByKey.clone()
	s.svcByVIP = s.svcByVIP.clone()
	s.endpoints = s.endpoints.clone()
	s.policyKeys = s.policyKeys.clone()
	s.policyRefs = s.policyRefs.clone()
}

// freeze ends writes to the indexes.
func (s *Snapshot) freeze() {
	s.byUID.freeze()
	s.byIP.freeze()
	s.byNode.freeze()
	s.svcByKey.freeze()
	s.svcByVIP.freeze()
	s.endpoints.freeze()
	s.policyKeys.freeze()
	s.policyRefs.freeze()
}

// checkPolicy validates a policy's scope, action and rules.
func checkPolicy(v *validator, where loc, p *AuthorizationPolicy) {
	switch p.Scope {
	case ScopeGlobal, ScopeNamespace, ScopeWorkloadSelector:
	case "":
		v.addf("%s: scope is required (Global, Namespace or WorkloadSelector)", where)
	default:
		v.addf("%s: scope: unknown value %q (want Global, Namespace or WorkloadSelector)", where, p.Scope)
	}
	if p.Action != ActionAllow && p.Action != ActionDeny {
		v.addf("%s: action: unknown value %q (want Allow or Deny)", where, p.Action)
	}
	validateRules(v, where, p.Rules)
}

// checkPeerAuths validates every peer authentication and returns the mesh
// mode and the mode of each namespace.
func checkPeerAuths(v *validator, pas []*PeerAuthentication) (MTLSMode, map[string]MTLSMode) {
	global, byNS := MTLSUnset, map[string]MTLSMode{}
	for i, pa := range pas {
		where := fmt.Sprintf("peerAuthentications[%d] (%s/%s)", i, pa.Namespace, pa.Name)
		if pa.Mode != MTLSStrict && pa.Mode != MTLSPermissive {
			v.addf("%s: mode: unknown value %q (want STRICT or PERMISSIVE)", where, pa.Mode)
			continue
		}
		switch pa.Scope {
		case ScopeGlobal:
			if global != MTLSUnset {
				v.addf("%s: a second Global peer authentication", where)
			}
			global = pa.Mode
		case ScopeNamespace:
			if pa.Namespace == "" {
				v.addf("%s: namespace is required for scope Namespace", where)
			} else if _, dup := byNS[pa.Namespace]; dup {
				v.addf("%s: a second peer authentication for namespace %q", where, pa.Namespace)
			}
			byNS[pa.Namespace] = pa.Mode
		default:
			v.addf("%s: scope: unknown value %q (want Global or Namespace)", where, pa.Scope)
		}
	}
	return global, byNS
}

// checkService validates svc against the other services and the workloads
// (a VIP may be neither another service's VIP nor a workload's IP) and
// returns it with its strings interned (a copy when any changed). Its key
// is checked by the caller.
func (s *Snapshot) checkService(v *validator, where loc, svc *Service) *Service {
	if len(svc.Ports) == 0 {
		v.addf("%s: ports: at least one port is required", where)
	}
	for sp := range svc.Ports {
		if sp == 0 {
			v.addf("%s: ports: service port 0 is invalid", where)
		}
	}
	vips := make([]NetworkAddress, 0, len(svc.VIPs))
	for j, vip := range svc.VIPs {
		if !vip.Addr.IsValid() {
			v.addf("%s: vips[%d]: invalid address", where, j)
			continue
		}
		vip.Addr = vip.Addr.Unmap()
		if prev, dup := s.svcByVIP.get(vip); dup && prev.Key() != svc.Key() {
			v.addf("%s: vips[%d]: %s is also a VIP of service %s", where, j, vip, prev.Key())
			continue
		}
		if w, dup := s.byIP.get(vip); dup {
			v.addf("%s: vips[%d]: %s is also an IP of workload %q", where, j, vip, w.UID)
			continue
		}
		vip.Network = Intern(vip.Network)
		vips = append(vips, vip)
	}
	c := *svc
	c.Namespace, c.Hostname, c.VIPs = Intern(svc.Namespace), Intern(svc.Hostname), vips
	c.Name, c.Ports = strings.Clone(svc.Name), maps.Clone(svc.Ports) // kept: copied next to c (see internWorkload)
	return &c
}

// putService indexes svc, replacing the service of the same key.
func (s *Snapshot) putService(svc *Service) {
	if old, ok := s.svcByKey.get(svc.Key()); ok {
		s.dropService(old)
	}
	s.svcByKey.set(svc.Key(), svc)
	for _, vip := range svc.VIPs {
		s.svcByVIP.set(vip, svc)
	}
}

// dropService removes svc from the indexes (not its endpoints).
func (s *Snapshot) dropService(svc *Service) {
	s.svcByKey.del(svc.Key())
	for _, vip := range svc.VIPs {
		if cur, ok := s.svcByVIP.get(vip); ok && cur == svc {
			s.svcByVIP.del(vip)
		}
	}
}

// checkWorkload validates in against the snapshot (its addresses against
// the other workloads and the VIPs, its references against the services and
// policies) and returns the copy to index, with defaults applied and strings
// interned. netnsOwner maps the network namespaces of this node's other
// workloads to their UIDs. Its UID is checked by the caller.
func (s *Snapshot) checkWorkload(v *validator, where loc, in *Workload, netnsOwner map[string]string) *Workload {
	w := *in // defaults go on a copy
	if w.Paths != nil && *w.Paths == (LocalPaths{}) {
		w.Paths = nil
	}
	if w.Name == "" || w.Namespace == "" {
		v.addf("%s: name and namespace are required", where)
	}
	switch w.Protocol {
	case "":
		w.Protocol = ProtocolTCP
	case ProtocolHBONE, ProtocolTCP:
	default:
		v.addf("%s: protocol: unknown value %q (want HBONE or TCP)", where, w.Protocol)
	}
	switch w.Status {
	case "":
		w.Status = Healthy
	case Healthy, Unhealthy:
	default:
		v.addf("%s: status: unknown value %q (want Healthy or Unhealthy)", where, w.Status)
	}
	switch w.MTLSMode {
	case MTLSUnset, MTLSStrict, MTLSPermissive:
	default:
		v.addf("%s: mtlsMode: unknown value %q (want STRICT or PERMISSIVE)", where, w.MTLSMode)
	}
	if len(w.WorkloadIPs) == 0 {
		v.addf("%s: workloadIps: at least one address is required", where)
	}
	if slices.ContainsFunc(w.WorkloadIPs, netip.Addr.Is4In6) { // unmapped on a copy: the input is shared
		ips := make([]netip.Addr, len(w.WorkloadIPs))
		for j, ip := range w.WorkloadIPs {
			ips[j] = ip.Unmap()
		}
		w.WorkloadIPs = ips
	}
	for j, ip := range w.WorkloadIPs {
		if !ip.IsValid() {
			v.addf("%s: workloadIps[%d]: invalid address", where, j)
			continue
		}
		na := NetworkAddress{Network: w.Network, Addr: ip}
		if prev, dup := s.byIP.get(na); dup && prev.UID != w.UID {
			v.addf("%s: workloadIps[%d]: duplicate IP %s (network %q) also used by workload %q", where, j, na.Addr, na.Network, prev.UID)
			continue
		}
		if slices.Contains(w.WorkloadIPs[:j], ip) {
			v.addf("%s: workloadIps[%d]: %s is listed twice", where, j, ip)
			continue
		}
		if svc, dup := s.svcByVIP.get(na); dup {
			v.addf("%s: workloadIps[%d]: %s is a VIP of service %s", where, j, na.Addr, svc.Key())
		}
	}
	for key := range w.Services {
		if _, ok := s.svcByKey.get(key); !ok {
			v.addf("%s: services: service %s is not defined in services", where, key)
		}
	}
	for j, ref := range w.AuthorizationPolicies {
		p, ok := s.policyKeys.get(ref)
		if !ok {
			v.addf("%s: authorizationPolicies[%d]: policy %q is not defined in policies", where, j, ref)
		} else if p.Scope != ScopeWorkloadSelector {
			v.addf("%s: authorizationPolicies[%d]: policy %q has scope %s, not WorkloadSelector", where, j, ref, p.Scope)
		}
	}
	if s.isLocal(&w) {
		validateLocal(v, where, &w, s.opts, netnsOwner)
	}
	internWorkload(&w)
	w.Services = s.svcMaps.canonical(w.Services, 4*s.svcByKey.len()+1024)
	return &w
}

// isLocal reports whether w is on this node and needs its network
// namespace checked: in the mesh, or with a netns or cgroup path set.
func (s *Snapshot) isLocal(w *Workload) bool {
	return s.opts.Node != "" && w.Node == s.opts.Node && (w.Protocol == ProtocolHBONE || w.NetnsPath() != "" || w.CgroupPath() != "")
}

// putWorkload indexes w in place of old (nil: none) by UID and IP, and
// counts its policy references. Node lists and endpoints are the caller's.
func (s *Snapshot) putWorkload(old, w *Workload) {
	if old != nil {
		s.dropWorkload(old)
	}
	s.byUID.set(w.UID, w)
	for _, ip := range w.WorkloadIPs {
		s.byIP.set(NetworkAddress{Network: w.Network, Addr: ip}, w)
	}
	for _, ref := range w.AuthorizationPolicies {
		n, _ := s.policyRefs.get(ref)
		s.policyRefs.set(ref, n+1)
	}
}

// dropWorkload removes w from the UID and IP indexes and its policy references.
func (s *Snapshot) dropWorkload(w *Workload) {
	s.byUID.del(w.UID)
	for _, ip := range w.WorkloadIPs {
		na := NetworkAddress{Network: w.Network, Addr: ip}
		if cur, ok := s.byIP.get(na); ok && cur == w {
			s.byIP.del(na)
		}
	}
	for _, ref := range w.AuthorizationPolicies {
		if n, _ := s.policyRefs.get(ref); n > 1 {
			s.policyRefs.set(ref, n-1)
		} else {
			s.policyRefs.del(ref)
		}
	}
}

// rescope rebuilds the Global and Namespace policy lists from s.policies: O(policies).
func (s *Snapshot) rescope() {
	s.global = nil
	byNS := map[string][]*AuthorizationPolicy{}
	for _, p := range s.policies {
		switch p.Scope {
		case ScopeGlobal:
			s.global = append(s.global, p)
		case ScopeNamespace:
			byNS[p.Namespace] = append(byNS[p.Namespace], p)
		}
	}
	s.scoped = make(map[string][]*AuthorizationPolicy, len(byNS))
	for ns, ps := range byNS {
		s.scoped[ns] = slices.Concat(s.global, ps)
	}
}

// reenroll rebuilds the list of enrolled workloads from this node's: O(local workloads).
func (s *Snapshot) reenroll() {
	s.enrolled = nil
	if s.opts.Node == "" {
		return
	}
	ws, _ := s.byNode.get(s.opts.Node)
	for _, w := range ws {
		if w.InMesh() {
			s.enrolled = append(s.enrolled, w)
		}
	}
}

func validateLocal(v *validator, where loc, w *Workload, opts Options, owner map[string]string) {
	if w.NetnsPath() == "" {
		v.addf("%s: netnsPath is required for a mesh (HBONE) workload on this node (%s)", where, w.Node)
		return
	}
	if !filepath.IsAbs(w.NetnsPath()) {
		v.addf("%s: netnsPath %q must be absolute", where, w.NetnsPath())
		return
	}
	if err := opts.CheckNetns(w.NetnsPath()); err != nil {
		v.addf("%s: netnsPath: network namespace of workload %s is not usable: %v", where, w.Name, err)
	}
	if prev, dup := owner[w.NetnsPath()]; dup && prev != w.UID {
		v.addf("%s: netnsPath %q is also used by workload %q", where, w.NetnsPath(), prev)
	}
	if w.CgroupPath() != "" {
		if !filepath.IsAbs(w.CgroupPath()) {
			v.addf("%s: cgroupPath %q must be absolute", where, w.CgroupPath())
		} else if err := opts.CheckCgroup(w.CgroupPath()); err != nil {
			v.addf("%s: cgroupPath: cgroup of workload %s is not usable: %v", where, w.Name, err)
		}
	}
}

func validateRules(v *validator, where loc, rules []Rule) {
	for r, rule := range rules {
		for c, clause := range rule {
			for m, match := range clause {
				at := fmt.Sprintf("%s: rules[%d][%d][%d]", where, r, c, m)
				for _, p := range slices.Concat(match.DestinationPorts, match.NotDestinationPorts) {
					if p == 0 {
						v.addf("%s: destination port 0 is invalid", at)
					}
				}
				for _, sm := range slices.Concat(match.Namespaces, match.NotNamespaces, match.Principals, match.NotPrincipals) {
					switch sm.Kind {
					case MatchExact, MatchPrefix, MatchSuffix, MatchPresence:
					default:
						v.addf("%s: unknown string match kind %q", at, sm.Kind)
					}
				}
				for _, pf := range slices.Concat(match.SourceIPs, match.NotSourceIPs, match.DestinationIPs, match.NotDestinationIPs) {
					if !pf.IsValid() {
						v.addf("%s: invalid ip block", at)
					}
				}
			}
		}
	}
}

type validator struct {
	errs    []error
	dropped int
}

func (v *validator) addf(format string, args ...any) {
	if len(v.errs) >= maxErrors {
		v.dropped++
		return
	}
	v.errs = append(v.errs, fmt.Errorf(format, args...))
}

func (v *validator) err() error {
	if v.dropped > 0 {
		v.errs = append(v.errs, fmt.Errorf("and %d more problems", v.dropped))
	}
	return errors.Join(v.errs...)
}

// Node returns the node name the snapshot was validated for.
func (s *Snapshot) Node() string { return s.opts.Node }

// Workloads returns every workload, sorted by UID. The list is built on the
// first call for this snapshot (O(n log n)); nothing on the connection path
// needs it.
func (s *Snapshot) Workloads() []*Workload {
	s.lists.workloadsOnce.Do(func() {
		ws := make([]*Workload, 0, s.byUID.len())
		s.byUID.all(func(_ string, w *Workload) bool { ws = append(ws, w); return true })
		slices.SortFunc(ws, byUIDOrder)
		s.lists.workloads = ws
	})
	return s.lists.workloads
}

// NumWorkloads returns the number of workloads: O(1).
func (s *Snapshot) NumWorkloads() int { return s.byUID.len() }

// NumServices returns the number of services: O(1).
func (s *Snapshot) NumServices() int { return s.svcByKey.len() }

// Services returns every service, sorted by namespace/hostname, built on
// the first call for this snapshot.
func (s *Snapshot) Services() []*Service {
	s.lists.servicesOnce.Do(func() {
		ss := make([]*Service, 0, s.svcByKey.len())
		s.svcByKey.all(func(_ NamespacedHostname, svc *Service) bool { ss = append(ss, svc); return true })
		slices.SortFunc(ss, func(a, b *Service) int { return compareKeys(a.Key(), b.Key()) })
		s.lists.services = ss
	})
	return s.lists.services
}

// Policies returns every authorization policy in input order.
func (s *Snapshot) Policies() []*AuthorizationPolicy { return s.policies }

// PeerAuthentications returns every peer authentication in input order.
func (s *Snapshot) PeerAuthentications() []*PeerAuthentication { return s.peerAuths }

// WorkloadByUID returns the workload with the given UID.
func (s *Snapshot) WorkloadByUID(uid string) (*Workload, bool) {
	return s.byUID.get(uid)
}

// WorkloadByIP returns the workload owning ip in network ("" is the default
// network). IPv4-mapped IPv6 addresses are unmapped first.
func (s *Snapshot) WorkloadByIP(network string, ip netip.Addr) (*Workload, bool) {
	return s.byIP.get(NetworkAddress{Network: network, Addr: ip.Unmap()})
}

// ServiceByAddr returns the service with VIP ip in network, whatever the port.
func (s *Snapshot) ServiceByAddr(network string, ip netip.Addr) (*Service, bool) {
	return s.svcByVIP.get(NetworkAddress{Network: network, Addr: ip.Unmap()})
}

// ServiceByVIP returns the service reached at VIP ip:port in network; false
// if no service has that VIP or the service does not expose the port.
func (s *Snapshot) ServiceByVIP(network string, vip netip.AddrPort) (*Service, bool) {
	svc, ok := s.ServiceByAddr(network, vip.Addr())
	if !ok {
		return nil, false
	}
	if _, ok := svc.Ports[vip.Port()]; !ok {
		return nil, false
	}
	return svc, true
}

// ServiceByKey returns the service named namespace/hostname.
func (s *Snapshot) ServiceByKey(key NamespacedHostname) (*Service, bool) {
	return s.svcByKey.get(key)
}

// Endpoints returns the endpoints of a service (healthy or not), sorted by workload UID.
func (s *Snapshot) Endpoints(svc *Service) []Endpoint {
	eps, _ := s.endpoints.get(svc.Key())
	return eps
}

// WorkloadsOnNode returns the workloads on the named node, sorted by UID.
func (s *Snapshot) WorkloadsOnNode(node string) []*Workload {
	ws, _ := s.byNode.get(node)
	return ws
}

// LocalWorkloads returns the workloads on this snapshot's node, in the mesh
// or not (none if the node is unnamed), sorted by UID.
func (s *Snapshot) LocalWorkloads() []*Workload {
	if s.opts.Node == "" {
		return nil
	}
	return s.WorkloadsOnNode(s.opts.Node)
}

// EnrolledWorkloads returns the local workloads in the mesh (protocol
// HBONE), sorted by UID: the ones the agent captures, serves and fetches
// certificates for. Each has a validated NetnsPath.
func (s *Snapshot) EnrolledWorkloads() []*Workload { return s.enrolled }

// RangeWorkloads calls fn for every workload, in no particular order, until
// fn returns false: O(workloads) without building the sorted list.
func (s *Snapshot) RangeWorkloads(fn func(*Workload) bool) {
	s.byUID.all(func(_ string, w *Workload) bool { return fn(w) })
}

// PolicyRefs returns how many workloads list the WorkloadSelector policy
// key ("namespace/name"): O(1).
func (s *Snapshot) PolicyRefs(key string) int {
	n, _ := s.policyRefs.get(key)
	return int(n)
}

// Policy returns the policy with key "namespace/name".
func (s *Snapshot) Policy(key string) (*AuthorizationPolicy, bool) {
	return s.policyKeys.get(key)
}

// PoliciesFor returns the policies that apply to a destination workload:
// Global ones, Namespace ones of its namespace, and the WorkloadSelector ones
// it lists, in that order; nil for a workload this snapshot does not hold.
// It costs O(1) (two lookups), plus a copy of the list when the workload
// lists WorkloadSelector policies.
func (s *Snapshot) PoliciesFor(w *Workload) []*AuthorizationPolicy {
	w, ok := s.byUID.get(w.UID)
	if !ok {
		return nil
	}
	ps, ok := s.scoped[w.Namespace]
	if !ok {
		ps = s.global
	}
	if len(w.AuthorizationPolicies) == 0 {
		return ps
	}
	out := make([]*AuthorizationPolicy, len(ps), len(ps)+len(w.AuthorizationPolicies))
	copy(out, ps)
	for _, ref := range w.AuthorizationPolicies {
		if p, ok := s.policyKeys.get(ref); ok {
			out = append(out, p)
		}
	}
	return out
}

// MTLSMode returns the effective peer-authentication mode of a workload: its
// own, else its namespace's, else the mesh's, else PERMISSIVE (Istio's default).
func (s *Snapshot) MTLSMode(w *Workload) MTLSMode {
	if w.MTLSMode != MTLSUnset {
		return w.MTLSMode
	}
	if m, ok := s.mtlsByNS[w.Namespace]; ok { // a small map: copied only when peer authentications change
		return m
	}
	if s.mtlsGlobal != MTLSUnset {
		return s.mtlsGlobal
	}
	return MTLSPermissive
}
