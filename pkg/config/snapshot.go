package config

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
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

// maxErrors bounds how many problems one validation reports.
const maxErrors = 20

// Snapshot is an immutable, validated configuration with O(1) lookups. It is
// safe for concurrent use; callers must not modify anything it returns.
type Snapshot struct {
	node string

	workloads []*Workload // sorted by UID
	services  []*Service  // sorted by key
	policies  []*AuthorizationPolicy
	peerAuths []*PeerAuthentication

	enrolled   []*Workload
	byUID      map[string]*Workload
	byIP       map[NetworkAddress]*Workload
	byNode     map[string][]*Workload
	svcByKey   map[NamespacedHostname]*Service
	svcByVIP   map[NetworkAddress]*Service
	endpoints  map[NamespacedHostname][]Endpoint
	policyKeys map[string]*AuthorizationPolicy
	policiesOf map[string][]*AuthorizationPolicy // by workload UID
	mtlsGlobal MTLSMode
	mtlsByNS   map[string]MTLSMode
}

// Empty returns a snapshot with no configuration for the given node.
func Empty(node string) *Snapshot {
	s, _ := NewSnapshot(Config{}, Options{Node: node}) // an empty Config has nothing to reject
	return s
}

// NewSnapshot validates c and indexes it. Defaults are applied to copies
// (protocol TCP, status Healthy, capacity as given); c's slices and maps are
// shared with the snapshot, so the caller must not modify them afterwards.
// The error joins every problem found (at most 20), each naming the item by
// its position and key, e.g. `workloads[2] (uid "x"): workloadIps[0]: ...`.
func NewSnapshot(c Config, opts Options) (*Snapshot, error) {
	if opts.CheckNetns == nil {
		opts.CheckNetns = CheckNetnsPath
	}
	if opts.CheckCgroup == nil {
		opts.CheckCgroup = CheckCgroupPath
	}
	v := &validator{}
	s := &Snapshot{
		node:       opts.Node,
		byUID:      make(map[string]*Workload, len(c.Workloads)),
		byIP:       make(map[NetworkAddress]*Workload, len(c.Workloads)),
		byNode:     make(map[string][]*Workload),
		svcByKey:   make(map[NamespacedHostname]*Service, len(c.Services)),
		svcByVIP:   make(map[NetworkAddress]*Service, len(c.Services)),
		endpoints:  make(map[NamespacedHostname][]Endpoint, len(c.Services)),
		policyKeys: make(map[string]*AuthorizationPolicy, len(c.Policies)),
		policiesOf: make(map[string][]*AuthorizationPolicy, len(c.Workloads)),
		mtlsByNS:   make(map[string]MTLSMode),
	}

	// Policies first: workloads refer to them.
	var global []*AuthorizationPolicy
	byNS := map[string][]*AuthorizationPolicy{}
	for i, p := range c.Policies {
		where := fmt.Sprintf("policies[%d] (%s/%s)", i, p.Namespace, p.Name)
		if p.Name == "" || p.Namespace == "" {
			v.addf("%s: name and namespace are required", where)
			continue
		}
		if _, dup := s.policyKeys[p.Key()]; dup {
			v.addf("%s: duplicate policy %s", where, p.Key())
			continue
		}
		switch p.Scope {
		case ScopeGlobal:
			global = append(global, p)
		case ScopeNamespace:
			byNS[p.Namespace] = append(byNS[p.Namespace], p)
		case ScopeWorkloadSelector:
		case "":
			v.addf("%s: scope is required (Global, Namespace or WorkloadSelector)", where)
		default:
			v.addf("%s: scope: unknown value %q (want Global, Namespace or WorkloadSelector)", where, p.Scope)
		}
		if p.Action != ActionAllow && p.Action != ActionDeny {
			v.addf("%s: action: unknown value %q (want Allow or Deny)", where, p.Action)
		}
		validateRules(v, where, p.Rules)
		s.policyKeys[p.Key()] = p
		s.policies = append(s.policies, p)
	}

	for i, pa := range c.PeerAuthentications {
		where := fmt.Sprintf("peerAuthentications[%d] (%s/%s)", i, pa.Namespace, pa.Name)
		if pa.Mode != MTLSStrict && pa.Mode != MTLSPermissive {
			v.addf("%s: mode: unknown value %q (want STRICT or PERMISSIVE)", where, pa.Mode)
			continue
		}
		switch pa.Scope {
		case ScopeGlobal:
			if s.mtlsGlobal != MTLSUnset {
				v.addf("%s: a second Global peer authentication", where)
			}
			s.mtlsGlobal = pa.Mode
		case ScopeNamespace:
			if pa.Namespace == "" {
				v.addf("%s: namespace is required for scope Namespace", where)
			} else if _, dup := s.mtlsByNS[pa.Namespace]; dup {
				v.addf("%s: a second peer authentication for namespace %q", where, pa.Namespace)
			}
			s.mtlsByNS[pa.Namespace] = pa.Mode
		default:
			v.addf("%s: scope: unknown value %q (want Global or Namespace)", where, pa.Scope)
		}
		s.peerAuths = append(s.peerAuths, pa)
	}

	for i, svc := range c.Services {
		where := fmt.Sprintf("services[%d] (%s/%s)", i, svc.Namespace, svc.Hostname)
		if svc.Name == "" || svc.Namespace == "" || svc.Hostname == "" {
			v.addf("%s: name, namespace and hostname are required", where)
			continue
		}
		if prev, dup := s.svcByKey[svc.Key()]; dup {
			v.addf("%s: duplicate service %s (also %s)", where, svc.Key(), prev.Name)
			continue
		}
		if len(svc.Ports) == 0 {
			v.addf("%s: ports: at least one port is required", where)
		}
		for sp := range svc.Ports {
			if sp == 0 {
				v.addf("%s: ports: service port 0 is invalid", where)
			}
		}
		for j, vip := range svc.VIPs {
			if !vip.Addr.IsValid() {
				v.addf("%s: vips[%d]: invalid address", where, j)
				continue
			}
			vip.Addr = vip.Addr.Unmap()
			if prev, dup := s.svcByVIP[vip]; dup {
				v.addf("%s: vips[%d]: %s is also a VIP of service %s", where, j, vip, prev.Key())
				continue
			}
			s.svcByVIP[vip] = svc
		}
		s.svcByKey[svc.Key()] = svc
		s.services = append(s.services, svc)
	}

	netnsOwner := map[string]string{}
	for i, in := range c.Workloads {
		w := *in // defaults go on a copy
		where := fmt.Sprintf("workloads[%d] (uid %q)", i, w.UID)
		if w.UID == "" {
			v.addf("%s: uid is required", where)
			continue
		}
		if _, dup := s.byUID[w.UID]; dup {
			v.addf("%s: duplicate uid", where)
			continue
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
		ips := make([]netip.Addr, 0, len(w.WorkloadIPs))
		for j, ip := range w.WorkloadIPs {
			if !ip.IsValid() {
				v.addf("%s: workloadIps[%d]: invalid address", where, j)
				continue
			}
			na := NetworkAddress{Network: w.Network, Addr: ip.Unmap()}
			if prev, dup := s.byIP[na]; dup {
				v.addf("%s: workloadIps[%d]: duplicate IP %s (network %q) also used by workload %q", where, j, na.Addr, na.Network, prev.UID)
				continue
			}
			if svc, dup := s.svcByVIP[na]; dup {
				v.addf("%s: workloadIps[%d]: %s is a VIP of service %s", where, j, na.Addr, svc.Key())
				continue
			}
			ips = append(ips, na.Addr)
		}
		w.WorkloadIPs = ips
		for key := range w.Services {
			if _, ok := s.svcByKey[key]; !ok {
				v.addf("%s: services: service %s is not defined in services", where, key)
			}
		}
		for j, ref := range w.AuthorizationPolicies {
			p, ok := s.policyKeys[ref]
			if !ok {
				v.addf("%s: authorizationPolicies[%d]: policy %q is not defined in policies", where, j, ref)
			} else if p.Scope != ScopeWorkloadSelector {
				v.addf("%s: authorizationPolicies[%d]: policy %q has scope %s, not WorkloadSelector", where, j, ref, p.Scope)
			}
		}
		if opts.Node != "" && w.Node == opts.Node && (w.Protocol == ProtocolHBONE || w.NetnsPath != "" || w.CgroupPath != "") {
			validateLocal(v, where, &w, opts, netnsOwner)
		}
		wp := &w
		s.byUID[w.UID] = wp
		for _, ip := range w.WorkloadIPs {
			s.byIP[NetworkAddress{Network: w.Network, Addr: ip}] = wp
		}
		s.byNode[w.Node] = append(s.byNode[w.Node], wp)
		s.workloads = append(s.workloads, wp)
	}

	if err := v.err(); err != nil {
		return nil, err
	}

	byUIDOrder := func(a, b *Workload) int { return cmp.Compare(a.UID, b.UID) }
	slices.SortFunc(s.workloads, byUIDOrder)
	for _, ws := range s.byNode {
		slices.SortFunc(ws, byUIDOrder)
	}
	slices.SortFunc(s.services, func(a, b *Service) int { return cmp.Compare(a.Key().String(), b.Key().String()) })
	for _, w := range s.workloads {
		if s.node != "" && w.Node == s.node && w.InMesh() {
			s.enrolled = append(s.enrolled, w)
		}
		for key, ports := range w.Services {
			svc := s.svcByKey[key]
			s.endpoints[key] = append(s.endpoints[key], Endpoint{Workload: w, Ports: ports, Service: svc})
		}
		ps := slices.Concat(global, byNS[w.Namespace])
		for _, ref := range w.AuthorizationPolicies {
			ps = append(ps, s.policyKeys[ref])
		}
		if len(ps) > 0 {
			s.policiesOf[w.UID] = ps
		}
	}
	return s, nil
}

func validateLocal(v *validator, where string, w *Workload, opts Options, owner map[string]string) {
	if w.NetnsPath == "" {
		v.addf("%s: netnsPath is required for a mesh (HBONE) workload on this node (%s)", where, w.Node)
		return
	}
	if !filepath.IsAbs(w.NetnsPath) {
		v.addf("%s: netnsPath %q must be absolute", where, w.NetnsPath)
		return
	}
	if err := opts.CheckNetns(w.NetnsPath); err != nil {
		v.addf("%s: netnsPath: network namespace of workload %s is not usable: %v", where, w.Name, err)
	}
	if prev, dup := owner[w.NetnsPath]; dup {
		v.addf("%s: netnsPath %q is also used by workload %q", where, w.NetnsPath, prev)
	}
	owner[w.NetnsPath] = w.UID
	if w.CgroupPath != "" {
		if !filepath.IsAbs(w.CgroupPath) {
			v.addf("%s: cgroupPath %q must be absolute", where, w.CgroupPath)
		} else if err := opts.CheckCgroup(w.CgroupPath); err != nil {
			v.addf("%s: cgroupPath: cgroup of workload %s is not usable: %v", where, w.Name, err)
		}
	}
}

func validateRules(v *validator, where string, rules []Rule) {
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
func (s *Snapshot) Node() string { return s.node }

// Workloads returns every workload, sorted by UID.
func (s *Snapshot) Workloads() []*Workload { return s.workloads }

// Services returns every service, sorted by namespace/hostname.
func (s *Snapshot) Services() []*Service { return s.services }

// Policies returns every authorization policy in input order.
func (s *Snapshot) Policies() []*AuthorizationPolicy { return s.policies }

// PeerAuthentications returns every peer authentication in input order.
func (s *Snapshot) PeerAuthentications() []*PeerAuthentication { return s.peerAuths }

// WorkloadByUID returns the workload with the given UID.
func (s *Snapshot) WorkloadByUID(uid string) (*Workload, bool) {
	w, ok := s.byUID[uid]
	return w, ok
}

// WorkloadByIP returns the workload owning ip in network ("" is the default
// network). IPv4-mapped IPv6 addresses are unmapped first.
func (s *Snapshot) WorkloadByIP(network string, ip netip.Addr) (*Workload, bool) {
	w, ok := s.byIP[NetworkAddress{Network: network, Addr: ip.Unmap()}]
	return w, ok
}

// ServiceByAddr returns the service with VIP ip in network, whatever the port.
func (s *Snapshot) ServiceByAddr(network string, ip netip.Addr) (*Service, bool) {
	svc, ok := s.svcByVIP[NetworkAddress{Network: network, Addr: ip.Unmap()}]
	return svc, ok
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
	svc, ok := s.svcByKey[key]
	return svc, ok
}

// Endpoints returns the endpoints of a service (healthy or not), sorted by workload UID.
func (s *Snapshot) Endpoints(svc *Service) []Endpoint { return s.endpoints[svc.Key()] }

// WorkloadsOnNode returns the workloads on the named node, sorted by UID.
func (s *Snapshot) WorkloadsOnNode(node string) []*Workload { return s.byNode[node] }

// LocalWorkloads returns the workloads on this snapshot's node, in the mesh
// or not (none if the node is unnamed), sorted by UID.
func (s *Snapshot) LocalWorkloads() []*Workload {
	if s.node == "" {
		return nil
	}
	return s.byNode[s.node]
}

// EnrolledWorkloads returns the local workloads in the mesh (protocol
// HBONE), sorted by UID: the ones the agent captures, serves and fetches
// certificates for. Each has a validated NetnsPath.
func (s *Snapshot) EnrolledWorkloads() []*Workload { return s.enrolled }

// Policy returns the policy with key "namespace/name".
func (s *Snapshot) Policy(key string) (*AuthorizationPolicy, bool) {
	p, ok := s.policyKeys[key]
	return p, ok
}

// PoliciesFor returns the policies that apply to a destination workload:
// Global ones, Namespace ones of its namespace, and the WorkloadSelector ones
// it lists.
func (s *Snapshot) PoliciesFor(w *Workload) []*AuthorizationPolicy { return s.policiesOf[w.UID] }

// MTLSMode returns the effective peer-authentication mode of a workload: its
// own, else its namespace's, else the mesh's, else PERMISSIVE (Istio's default).
func (s *Snapshot) MTLSMode(w *Workload) MTLSMode {
	if w.MTLSMode != MTLSUnset {
		return w.MTLSMode
	}
	if m, ok := s.mtlsByNS[w.Namespace]; ok {
		return m
	}
	if s.mtlsGlobal != MTLSUnset {
		return s.mtlsGlobal
	}
	return MTLSPermissive
}
