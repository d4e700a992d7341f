package xds

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/istioval"
	"github.com/warren-mesh/warren/pkg/config/xds/workloadapi"
	"github.com/warren-mesh/warren/pkg/config/xds/workloadapi/security"
)

// convertWorkload converts one istio.workload.Workload. An error means the
// resource cannot be applied (it is NACKed and its previous version kept);
// notes are what the conversion left out but applied anyway (reported in
// Status).
func convertWorkload(w *workloadapi.Workload) (*config.Workload, []string, error) {
	var notes []string
	if w.GetUid() == "" {
		return nil, nil, errors.New("uid is empty")
	}
	if w.GetName() == "" || w.GetNamespace() == "" {
		return nil, nil, errors.New("name and namespace are required")
	}
	out := &config.Workload{
		UID: w.GetUid(), Name: w.GetName(), Namespace: w.GetNamespace(),
		TrustDomain: w.GetTrustDomain(), ServiceAccount: w.GetServiceAccount(),
		Network: w.GetNetwork(), Node: w.GetNode(),
		Capacity: 1,
	}
	meta := config.WorkloadMeta{ClusterID: w.GetClusterId(), WorkloadName: w.GetWorkloadName(),
		CanonicalName: w.GetCanonicalName(), CanonicalRevision: w.GetCanonicalRevision()}
	if out.ServiceAccount == "" {
		out.ServiceAccount = "default" // Istio's default when istiod sends none
	}
	switch t := w.GetWorkloadType(); t {
	case workloadapi.WorkloadType_DEPLOYMENT:
		meta.WorkloadType = "deployment"
	case workloadapi.WorkloadType_CRONJOB:
		meta.WorkloadType = "cronjob"
	case workloadapi.WorkloadType_POD:
		meta.WorkloadType = "pod"
	case workloadapi.WorkloadType_JOB:
		meta.WorkloadType = "job"
	default:
		notes = append(notes, fmt.Sprintf("workloadType %d unknown: left empty", t))
	}
	for i, b := range w.GetAddresses() {
		a, ok := netip.AddrFromSlice(b)
		if !ok {
			return nil, nil, fmt.Errorf("addresses[%d]: %d bytes, want 4 or 16", i, len(b))
		}
		out.WorkloadIPs = append(out.WorkloadIPs, a.Unmap())
	}
	if len(out.WorkloadIPs) == 0 {
		// Hostname-only workloads (ServiceEntry DNS endpoints) cannot be
		// captured or matched by address at L4.
		return nil, nil, errors.New("no addresses (hostname-only workloads are not supported)")
	}
	switch p := w.GetTunnelProtocol(); p {
	case workloadapi.TunnelProtocol_HBONE:
		out.Protocol = config.ProtocolHBONE
	case workloadapi.TunnelProtocol_NONE:
		out.Protocol = config.ProtocolTCP
	default:
		// LEGACY_ISTIO_MTLS (sidecars) and anything newer: sending plain
		// TCP would bypass the peer's mTLS requirement, so do not apply.
		return nil, nil, fmt.Errorf("tunnelProtocol %s is not supported", p)
	}
	switch s := w.GetStatus(); s {
	case workloadapi.WorkloadStatus_HEALTHY:
		out.Status = config.Healthy
	case workloadapi.WorkloadStatus_UNHEALTHY:
		out.Status = config.Unhealthy
	default:
		return nil, nil, fmt.Errorf("status %d unknown", s)
	}
	if c := w.GetCapacity(); c != nil {
		out.Capacity = c.GetValue()
	}
	if l := w.GetLocality(); l != nil {
		out.SetLocality(config.Locality{Region: l.GetRegion(), Zone: l.GetZone(), Subzone: l.GetSubzone()})
	}
	out.SetMeta(meta)
	if len(w.GetServices()) > 0 {
		out.Services = make(map[config.NamespacedHostname]config.PortMap, len(w.GetServices()))
		for key, pl := range w.GetServices() {
			nh, err := config.ParseNamespacedHostname(key)
			if err != nil {
				return nil, nil, fmt.Errorf("services[%q]: %w", key, err)
			}
			pm, err := portMap(pl.GetPorts())
			if err != nil {
				return nil, nil, fmt.Errorf("services[%q]: %w", key, err)
			}
			out.Services[nh] = pm
		}
	}
	out.AuthorizationPolicies = append([]string(nil), w.GetAuthorizationPolicies()...)
	if wp := w.GetWaypoint(); wp != nil {
		var err error
		if out.Waypoint, err = convertWaypoint(wp); err != nil {
			return nil, nil, fmt.Errorf("waypoint: %w", err)
		}
	}
	if w.GetNetworkGateway() != nil {
		notes = append(notes, "networkGateway set: not honoured by this warren")
	}
	if w.GetNetworkMode() == workloadapi.NetworkMode_HOST_NETWORK && out.Protocol == config.ProtocolHBONE {
		return nil, nil, errors.New("a host-network workload cannot be in the mesh")
	}
	return out, notes, nil
}

// convertWaypoint converts a workload's or service's waypoint (a
// GatewayAddress: an IP, a workload's or the waypoint service's VIP, or the
// waypoint service's namespace/hostname, and the HBONE port). A waypoint
// that cannot be used is an error: applying the resource without it would
// send its traffic straight to the destination, past the waypoint.
func convertWaypoint(g *workloadapi.GatewayAddress) (*config.Waypoint, error) {
	p := g.GetHboneMtlsPort()
	if p > 65535 {
		return nil, fmt.Errorf("hboneMtlsPort %d out of range", p)
	}
	out := &config.Waypoint{HBONEPort: uint16(p)}
	switch d := g.GetDestination().(type) {
	case *workloadapi.GatewayAddress_Address:
		ip, ok := netip.AddrFromSlice(d.Address.GetAddress())
		if !ok {
			return nil, fmt.Errorf("address: %d bytes, want 4 or 16", len(d.Address.GetAddress()))
		}
		out.Address = config.NetworkAddress{Network: d.Address.GetNetwork(), Addr: ip.Unmap()}
	case *workloadapi.GatewayAddress_Hostname:
		if d.Hostname.GetNamespace() == "" || d.Hostname.GetHostname() == "" {
			return nil, errors.New("hostname: namespace and hostname are required")
		}
		out.Service = config.NamespacedHostname{Namespace: d.Hostname.GetNamespace(), Hostname: d.Hostname.GetHostname()}
	default:
		return nil, errors.New("no address or hostname")
	}
	return out, nil
}

// portMap converts Istio's port list (service port → target port, 0 meaning
// "the service's").
func portMap(ports []*workloadapi.Port) (config.PortMap, error) {
	pm := make(config.PortMap, len(ports))
	for i, p := range ports {
		sp, tp := p.GetServicePort(), p.GetTargetPort()
		if sp == 0 || sp > 65535 || tp > 65535 {
			return nil, fmt.Errorf("ports[%d]: %d -> %d out of range", i, sp, tp)
		}
		pm[uint16(sp)] = uint16(tp)
	}
	return pm, nil
}

// convertService converts one istio.workload.Service.
func convertService(s *workloadapi.Service) (*config.Service, []string, error) {
	var notes []string
	if s.GetName() == "" || s.GetNamespace() == "" || s.GetHostname() == "" {
		return nil, nil, errors.New("name, namespace and hostname are required")
	}
	out := &config.Service{Name: s.GetName(), Namespace: s.GetNamespace(), Hostname: s.GetHostname(),
		SubjectAltNames: append([]string(nil), s.GetSubjectAltNames()...)}
	for i, a := range s.GetAddresses() {
		ip, ok := netip.AddrFromSlice(a.GetAddress())
		if !ok {
			return nil, nil, fmt.Errorf("addresses[%d]: %d bytes, want 4 or 16", i, len(a.GetAddress()))
		}
		if a.Length != nil && int(a.GetLength()) != ip.Unmap().BitLen() {
			// A CIDR VIP (ServiceEntry address range): the model has
			// single addresses only.
			notes = append(notes, fmt.Sprintf("addresses[%d]: prefix /%d left out", i, a.GetLength()))
			continue
		}
		out.VIPs = append(out.VIPs, config.NetworkAddress{Network: a.GetNetwork(), Addr: ip.Unmap()})
	}
	pm, err := portMap(s.GetPorts())
	if err != nil {
		return nil, nil, err
	}
	if len(pm) == 0 {
		return nil, nil, errors.New("no ports")
	}
	out.Ports = pm
	if wp := s.GetWaypoint(); wp != nil {
		var err error
		if out.Waypoint, err = convertWaypoint(wp); err != nil {
			return nil, nil, fmt.Errorf("waypoint: %w", err)
		}
	}
	if len(s.GetWeightedWaypoints()) > 0 {
		// Weighted waypoints would split traffic between several: applying
		// the service without them could send it straight to the endpoints,
		// bypassing the waypoints' policy. Not applied.
		return nil, nil, errors.New("weightedWaypoints are not supported")
	}
	if lb := s.GetLoadBalancing(); lb != nil {
		var note string
		if out.LoadBalancing, note, err = convertLoadBalancing(lb); err != nil {
			return nil, nil, fmt.Errorf("loadBalancing: %w", err)
		}
		if note != "" {
			notes = append(notes, note)
		}
	}
	return out, notes, nil
}

// convertLoadBalancing converts a service's load balancing as ztunnel
// applies it (src/state.rs load_balance at 62d826530e5c): STRICT keeps only
// the endpoints sharing every routing-preference scope with the client,
// FAILOVER prefers the longest shared prefix, an unspecified mode ignores
// the preference; ALLOW_ALL also picks unhealthy endpoints. PASSTHROUGH
// (send to the original destination, no endpoint selection) is not
// honoured: warren picks an endpoint as in the unspecified mode, which keeps
// the connection in the mesh (a note says so). A value this build does not
// know rejects the service: it could be a STRICT-like restriction.
func convertLoadBalancing(lb *workloadapi.LoadBalancing) (*config.LoadBalancing, string, error) {
	out := &config.LoadBalancing{}
	var note string
	switch m := lb.GetMode(); m {
	case workloadapi.LoadBalancing_UNSPECIFIED_MODE:
		out.Mode = config.LBStandard
	case workloadapi.LoadBalancing_STRICT:
		out.Mode = config.LBStrict
	case workloadapi.LoadBalancing_FAILOVER:
		out.Mode = config.LBFailover
	case workloadapi.LoadBalancing_PASSTHROUGH:
		out.Mode = config.LBStandard
		note = "loadBalancing mode PASSTHROUGH: not honoured by this warren (an endpoint is picked, over HBONE when it is in the mesh)"
	default:
		return nil, "", fmt.Errorf("unknown mode %d", m)
	}
	for _, sc := range lb.GetRoutingPreference() {
		var s config.LBScope
		switch sc {
		case workloadapi.LoadBalancing_REGION:
			s = config.ScopeRegion
		case workloadapi.LoadBalancing_ZONE:
			s = config.ScopeZone
		case workloadapi.LoadBalancing_SUBZONE:
			s = config.ScopeSubzone
		case workloadapi.LoadBalancing_NODE:
			s = config.ScopeNode
		case workloadapi.LoadBalancing_CLUSTER:
			s = config.ScopeCluster
		case workloadapi.LoadBalancing_NETWORK:
			s = config.ScopeNetwork
		default:
			return nil, "", fmt.Errorf("unknown routing preference scope %d", sc)
		}
		out.RoutingPreference = append(out.RoutingPreference, s)
	}
	switch hp := lb.GetHealthPolicy(); hp {
	case workloadapi.LoadBalancing_ONLY_HEALTHY:
	case workloadapi.LoadBalancing_ALLOW_ALL:
		out.AllowUnhealthy = true
	default:
		return nil, "", fmt.Errorf("unknown health policy %d", hp)
	}
	return out, note, nil
}

// convertAuthorization converts one istio.security.Authorization. istiod
// has already turned the AuthorizationPolicy into ztunnel's L4 shape (groups
// = rules, rules = clauses, matches = alternatives); what is checked here is
// that every value can be used. A group holding one that cannot fails closed
// exactly like the Kubernetes provider's rules: it is recorded in Invalid and
// left out of Rules (an ALLOW group then grants nothing; a DENY policy with
// an invalid group denies its whole scope, see package policy). An unknown
// scope or action cannot be applied at all: an error.
func convertAuthorization(a *security.Authorization) (*config.AuthorizationPolicy, error) {
	if a.GetName() == "" || a.GetNamespace() == "" {
		return nil, errors.New("name and namespace are required")
	}
	out := &config.AuthorizationPolicy{Name: a.GetName(), Namespace: a.GetNamespace(), DryRun: a.GetDryRun()}
	switch s := a.GetScope(); s {
	case security.Scope_GLOBAL:
		out.Scope = config.ScopeGlobal
	case security.Scope_NAMESPACE:
		out.Scope = config.ScopeNamespace
	case security.Scope_WORKLOAD_SELECTOR:
		out.Scope = config.ScopeWorkloadSelector
	default:
		return nil, fmt.Errorf("scope %d unknown", s)
	}
	switch act := a.GetAction(); act {
	case security.Action_ALLOW:
		out.Action = config.ActionAllow
	case security.Action_DENY:
		out.Action = config.ActionDeny
	default:
		return nil, fmt.Errorf("action %d unknown", act)
	}
	if len(a.GetExtensions()) > 0 {
		out.Invalid = []string{fmt.Sprintf("extensions %v are not understood by this warren", extensionNames(a.GetExtensions()))}
		return out, nil
	}
	for i, g := range a.GetGroups() {
		rule, err := convertGroup(g)
		if err != nil {
			out.Invalid = append(out.Invalid, fmt.Sprintf("groups[%d]: %v", i, err))
			continue
		}
		out.Rules = append(out.Rules, rule)
	}
	return out, nil
}

func extensionNames(ext []*workloadapi.Extension) []string {
	var n []string
	for _, e := range ext {
		n = append(n, e.GetName())
	}
	return n
}

func convertGroup(g *security.Group) (config.Rule, error) {
	var rule config.Rule
	var errs []error
	for i, r := range g.GetRules() {
		var clause config.Clause
		for j, m := range r.GetMatches() {
			cm, err := convertMatch(m)
			if err != nil {
				errs = append(errs, fmt.Errorf("rules[%d].matches[%d]: %w", i, j, err))
				continue
			}
			clause = append(clause, cm)
		}
		rule = append(rule, clause)
	}
	return rule, errors.Join(errs...)
}

func convertMatch(m *security.Match) (config.Match, error) {
	var out config.Match
	var errs []error
	field := func(name string, err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	var err error
	out.Namespaces, err = stringMatches(m.GetNamespaces(), istioval.Namespace)
	field("namespaces", err)
	out.NotNamespaces, err = stringMatches(m.GetNotNamespaces(), istioval.Namespace)
	field("notNamespaces", err)
	out.Principals, err = stringMatches(m.GetPrincipals(), istioval.Principal)
	field("principals", err)
	out.NotPrincipals, err = stringMatches(m.GetNotPrincipals(), istioval.Principal)
	field("notPrincipals", err)
	out.ServiceAccounts, err = serviceAccounts(m.GetServiceAccounts())
	field("serviceAccounts", err)
	out.NotServiceAccounts, err = serviceAccounts(m.GetNotServiceAccounts())
	field("notServiceAccounts", err)
	out.SourceIPs, err = prefixes(m.GetSourceIps())
	field("sourceIps", err)
	out.NotSourceIPs, err = prefixes(m.GetNotSourceIps())
	field("notSourceIps", err)
	out.DestinationIPs, err = prefixes(m.GetDestinationIps())
	field("destinationIps", err)
	out.NotDestinationIPs, err = prefixes(m.GetNotDestinationIps())
	field("notDestinationIps", err)
	out.DestinationPorts, err = ports(m.GetDestinationPorts())
	field("destinationPorts", err)
	out.NotDestinationPorts, err = ports(m.GetNotDestinationPorts())
	field("notDestinationPorts", err)
	if len(m.GetExtensions()) > 0 {
		errs = append(errs, fmt.Errorf("extensions %v are not understood by this warren", extensionNames(m.GetExtensions())))
	}
	if err := errors.Join(errs...); err != nil {
		return config.Match{}, err
	}
	return out, nil
}

// stringMatches renders each of istiod's typed string matches in Istio's
// pattern syntax and parses it with the shared istioval parser, so that the
// values warren refuses from a file or the API server are refused here too.
func stringMatches(in []*security.StringMatch, parse func(string) (config.StringMatch, error)) ([]config.StringMatch, error) {
	pats := make([]string, 0, len(in))
	for i, sm := range in {
		var p string
		switch mt := sm.GetMatchType().(type) {
		case *security.StringMatch_Exact:
			p = mt.Exact
			if strings.Contains(p, "*") {
				return nil, fmt.Errorf("[%d]: exact %q holds a wildcard", i, p)
			}
		case *security.StringMatch_Prefix:
			p = mt.Prefix + "*"
		case *security.StringMatch_Suffix:
			p = "*" + mt.Suffix
		case *security.StringMatch_Presence:
			p = "*"
		default:
			return nil, fmt.Errorf("[%d]: no match type", i)
		}
		pats = append(pats, p)
	}
	return istioval.List(pats, parse)
}

func serviceAccounts(in []*security.ServiceAccountMatch) ([]config.ServiceAccountMatch, error) {
	var out []config.ServiceAccountMatch
	var errs []error
	for i, sa := range in {
		m, err := istioval.ServiceAccountOf(sa.GetNamespace(), sa.GetServiceAccount())
		if err != nil {
			errs = append(errs, fmt.Errorf("[%d]: %w", i, err))
			continue
		}
		out = append(out, m)
	}
	return out, errors.Join(errs...)
}

func prefixes(in []*security.Address) ([]netip.Prefix, error) {
	var out []netip.Prefix
	var errs []error
	for i, a := range in {
		ip, ok := netip.AddrFromSlice(a.GetAddress())
		if !ok {
			errs = append(errs, fmt.Errorf("[%d]: %d address bytes, want 4 or 16", i, len(a.GetAddress())))
			continue
		}
		p, err := istioval.IPBlock(fmt.Sprintf("%s/%d", ip, a.GetLength()))
		if err != nil {
			errs = append(errs, fmt.Errorf("[%d]: %w", i, err))
			continue
		}
		out = append(out, p)
	}
	return out, errors.Join(errs...)
}

func ports(in []uint32) ([]uint16, error) {
	var out []uint16
	var errs []error
	for i, p := range in {
		n, err := istioval.PortNumber(int64(p))
		if err != nil {
			errs = append(errs, fmt.Errorf("[%d]: %w", i, err))
			continue
		}
		out = append(out, n)
	}
	return out, errors.Join(errs...)
}
