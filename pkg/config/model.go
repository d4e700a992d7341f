package config

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"unique"
)

// DefaultTrustDomain is the SPIFFE trust domain of a workload that names none.
const DefaultTrustDomain = "cluster.local"

// Protocol is the tunnel protocol a workload accepts inbound.
type Protocol string

// Protocols a workload may accept.
const (
	// ProtocolHBONE means the workload is in the mesh: reach it with HBONE on port 15008.
	ProtocolHBONE Protocol = "HBONE"
	// ProtocolTCP means the workload is outside the mesh: reach it with plain TCP.
	ProtocolTCP Protocol = "TCP"
)

// HealthStatus says whether a workload may receive new connections through a service.
type HealthStatus string

// Health states.
const (
	Healthy   HealthStatus = "Healthy"
	Unhealthy HealthStatus = "Unhealthy"
)

// MTLSMode is a peer-authentication mode: whether plaintext inbound is accepted.
type MTLSMode string

// Peer-authentication modes. The zero value means "not set here, inherit".
const (
	MTLSUnset      MTLSMode = ""
	MTLSStrict     MTLSMode = "STRICT"
	MTLSPermissive MTLSMode = "PERMISSIVE"
)

// Scope says which workloads a policy applies to.
type Scope string

// Policy scopes, as ztunnel's RbacScope.
const (
	// ScopeGlobal applies to every workload (Istio: a policy in the root namespace).
	ScopeGlobal Scope = "Global"
	// ScopeNamespace applies to every workload in the policy's namespace.
	ScopeNamespace Scope = "Namespace"
	// ScopeWorkloadSelector applies to the workloads that list the policy in
	// their authorizationPolicies.
	ScopeWorkloadSelector Scope = "WorkloadSelector"
)

// Action is what a matching authorization policy does.
type Action string

// Authorization actions.
const (
	ActionAllow Action = "Allow"
	ActionDeny  Action = "Deny"
)

// Locality is where a workload runs; endpoint selection prefers the most specific match.
type Locality struct {
	Region  string
	Zone    string
	Subzone string
}

// String returns "region/zone/subzone".
func (l Locality) String() string { return l.Region + "/" + l.Zone + "/" + l.Subzone }

// NamespacedHostname names a service as "namespace/hostname".
type NamespacedHostname struct {
	Namespace string
	Hostname  string
}

// String returns "namespace/hostname".
func (n NamespacedHostname) String() string { return n.Namespace + "/" + n.Hostname }

// ParseNamespacedHostname parses "namespace/hostname".
func ParseNamespacedHostname(s string) (NamespacedHostname, error) {
	ns, host, ok := strings.Cut(s, "/")
	if !ok || ns == "" || host == "" {
		return NamespacedHostname{}, fmt.Errorf("parse %q: want namespace/hostname", s)
	}
	return NamespacedHostname{Namespace: ns, Hostname: host}, nil
}

// NetworkAddress is an IP address within a network ("" is the default network).
type NetworkAddress struct {
	Network string
	Addr    netip.Addr
}

// String returns "network/ip", the form used in configuration files.
func (a NetworkAddress) String() string { return a.Network + "/" + a.Addr.String() }

// ParseNetworkAddress parses "network/ip"; the network may be empty ("/10.0.0.1").
// A bare IP with no slash is taken as the default network.
func ParseNetworkAddress(s string) (NetworkAddress, error) {
	network, ip, ok := strings.Cut(s, "/")
	if !ok {
		network, ip = "", s
	}
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		return NetworkAddress{}, fmt.Errorf("parse network address %q: want network/ip: %w", s, err)
	}
	if addr.Zone() != "" {
		return NetworkAddress{}, fmt.Errorf("parse network address %q: zoned addresses are not supported", s)
	}
	return NetworkAddress{Network: network, Addr: addr.Unmap()}, nil
}

// DefaultWaypointHBONEPort is a waypoint's HBONE port when none is given.
const DefaultWaypointHBONEPort = 15008

// Waypoint is an L7 proxy that traffic to a workload or service goes
// through instead of going to it directly (Istio's GatewayAddress in the
// workload API's waypoint field). The waypoint is itself a workload of the
// mesh: traffic reaches it over HBONE at its address and HBONEPort, with the
// original destination as the CONNECT authority, and the waypoint's own
// workload identity is what its certificate must prove. A waypoint that
// resolves to no known workload gets no traffic: connections to what it
// fronts fail (they never go to the destination directly).
type Waypoint struct {
	// Address is the waypoint's IP: a workload's address, or a VIP of the
	// waypoint's service (one of its endpoints is picked, on HBONEPort).
	// Unset when the waypoint is named by Service.
	Address NetworkAddress
	// Service names the waypoint's service when istiod gives it by hostname
	// instead of by address (one of its endpoints is picked, on HBONEPort).
	Service NamespacedHostname
	// HBONEPort is the port the waypoint accepts HBONE on (Istio's
	// hbone_mtls_port; 0 means DefaultWaypointHBONEPort).
	HBONEPort uint16
}

// Port returns the waypoint's HBONE port, DefaultWaypointHBONEPort if unset.
func (w *Waypoint) Port() uint16 {
	if w.HBONEPort == 0 {
		return DefaultWaypointHBONEPort
	}
	return w.HBONEPort
}

// String identifies the waypoint in logs: "network/ip:port" or "namespace/hostname:port".
func (w *Waypoint) String() string {
	if w.Address.Addr.IsValid() {
		return fmt.Sprintf("%s:%d", w.Address, w.Port())
	}
	return fmt.Sprintf("%s:%d", w.Service, w.Port())
}

// PortMap maps a service port to a target port.
type PortMap map[uint16]uint16

// Workload is one addressable workload (a pod, or any process in its own
// network namespace).
//
// A mesh holds one per pod — 100,000 on a big cluster, each in every
// agent's snapshot — so the struct is kept within the 256-byte size class
// (it was 392 B, 416 with its size class): what the replicas of one
// deployment share (cluster, workload and canonical names) is one interned
// WorkloadMeta, set with SetMeta and read with Meta or its accessors; the
// locality, shared by the workloads of a zone, is interned on its own
// (SetLocality, Locality), so that a deployment spread over three zones
// still has one WorkloadMeta; and the paths only the workload's own node
// uses (netns, cgroup) sit behind one pointer, Paths, nil on every other
// workload. The JSON form (MarshalJSON) is the flat object of the former
// struct.
type Workload struct {
	// UID identifies the workload uniquely across the mesh (ztunnel: "cluster//v1/Pod/ns/name").
	UID       string
	Name      string
	Namespace string
	// TrustDomain of the workload's SPIFFE identity; empty means DefaultTrustDomain.
	TrustDomain    string
	ServiceAccount string
	// Network the workload's IPs belong to ("" is the default network).
	Network     string
	WorkloadIPs []netip.Addr
	Protocol    Protocol
	// Node is the name of the node the workload runs on.
	Node string
	// Services maps each service this workload backs to the workload's own
	// port map (service port → target port; a 0 target means "the service's").
	Services map[NamespacedHostname]PortMap
	// Capacity is the workload's weight in endpoint selection (default 1; 0 gets no traffic).
	Capacity uint32
	Status   HealthStatus
	// AuthorizationPolicies lists the "namespace/name" keys of
	// WorkloadSelector-scoped policies that select this workload.
	AuthorizationPolicies []string
	// MTLSMode overrides the namespace and mesh peer-authentication mode (warren extension).
	MTLSMode MTLSMode
	// Waypoint, when set, receives all traffic addressed to this workload's
	// own IPs (not traffic to a service it backs: that follows the
	// service's Waypoint). Optional; see Waypoint.
	Waypoint *Waypoint

	// Paths, when set, locates the workload on its node (network
	// namespace, cgroup): only that node's agent uses it, so every other
	// workload has nil here. Read it with NetnsPath and CgroupPath. Copies
	// of a Workload share it: replace it (SetNetnsPath, SetCgroupPath),
	// never modify it.
	Paths *LocalPaths

	// meta is the interned WorkloadMeta; the zero handle (never set) is
	// the zero WorkloadMeta. See Meta.
	meta unique.Handle[WorkloadMeta]
	// locality is the interned Locality; the zero handle is the zero
	// Locality. See Locality.
	locality unique.Handle[Locality]
}

// WorkloadMeta describes a workload beyond what routing needs: its
// cluster, the controller it belongs to, its canonical service name and
// revision (telemetry). The replicas of a deployment have equal
// WorkloadMeta, so a Workload holds it interned (package unique): one copy
// per distinct value (about 300 bytes with the table's entry), a pointer
// per workload.
type WorkloadMeta struct {
	ClusterID         string
	WorkloadName      string
	WorkloadType      string
	CanonicalName     string
	CanonicalRevision string
}

// LocalPaths locate a workload on its node (Workload.Paths).
type LocalPaths struct {
	// NetnsPath is the workload's network namespace, for example
	// /var/run/netns/pod-a or /proc/<pid>/ns/net (warren extension;
	// required for local workloads in the mesh, checked when set on others).
	NetnsPath string
	// CgroupPath is the workload's cgroup v2 directory, if capture keys on
	// it (warren extension; optional).
	CgroupPath string
}

// Meta returns the workload's WorkloadMeta (the zero value if none was set).
func (w *Workload) Meta() WorkloadMeta { return internedValue(w.meta) }

// SetMeta sets the workload's WorkloadMeta, interned.
func (w *Workload) SetMeta(m WorkloadMeta) { w.meta = internZero(m) }

// internedValue is h's value; the zero handle (never set) stands for T's
// zero value.
func internedValue[T comparable](h unique.Handle[T]) T {
	if h == (unique.Handle[T]{}) {
		var zero T
		return zero
	}
	return h.Value()
}

// internZero interns v, and gives the zero handle for T's zero value (a
// workload without it holds no entry in unique's table).
func internZero[T comparable](v T) unique.Handle[T] {
	var zero T
	if v == zero {
		return unique.Handle[T]{}
	}
	return unique.Make(v)
}

// ClusterID is the cluster the workload runs in (WorkloadMeta.ClusterID).
func (w *Workload) ClusterID() string { return w.Meta().ClusterID }

// WorkloadName is the name of the controller (Deployment, Job, …) the
// workload belongs to (WorkloadMeta.WorkloadName).
func (w *Workload) WorkloadName() string { return w.Meta().WorkloadName }

// WorkloadType is the kind of that controller, lower case: deployment,
// cronjob, job or pod (WorkloadMeta.WorkloadType).
func (w *Workload) WorkloadType() string { return w.Meta().WorkloadType }

// CanonicalName is the workload's canonical service name (WorkloadMeta.CanonicalName).
func (w *Workload) CanonicalName() string { return w.Meta().CanonicalName }

// CanonicalRevision is the workload's canonical revision (WorkloadMeta.CanonicalRevision).
func (w *Workload) CanonicalRevision() string { return w.Meta().CanonicalRevision }

// Locality is where the workload runs; endpoint selection prefers the
// client's. The zero Locality when unset.
func (w *Workload) Locality() Locality { return internedValue(w.locality) }

// SetLocality sets the workload's Locality, interned.
func (w *Workload) SetLocality(l Locality) { w.locality = internZero(l) }

// NetnsPath returns Paths.NetnsPath, empty when Paths is nil.
func (w *Workload) NetnsPath() string {
	if w.Paths == nil {
		return ""
	}
	return w.Paths.NetnsPath
}

// CgroupPath returns Paths.CgroupPath, empty when Paths is nil.
func (w *Workload) CgroupPath() string {
	if w.Paths == nil {
		return ""
	}
	return w.Paths.CgroupPath
}

// SetNetnsPath sets Paths.NetnsPath on a new LocalPaths (copies of w may share the old one).
func (w *Workload) SetNetnsPath(path string) { w.SetPaths(path, w.CgroupPath()) }

// SetCgroupPath sets Paths.CgroupPath on a new LocalPaths (copies of w may share the old one).
func (w *Workload) SetCgroupPath(path string) { w.SetPaths(w.NetnsPath(), path) }

// SetPaths replaces w.Paths with a new LocalPaths, or nil when both paths
// are empty.
func (w *Workload) SetPaths(netns, cgroup string) {
	if netns == "" && cgroup == "" {
		w.Paths = nil
		return
	}
	w.Paths = &LocalPaths{NetnsPath: netns, CgroupPath: cgroup}
}

// workloadJSON is the JSON form of a Workload: the flat field list the
// struct had before WorkloadMeta and the local paths moved out of it, in
// the same order, so /config_dump and `inspect` did not change.
type workloadJSON struct {
	UID                   string
	Name                  string
	Namespace             string
	TrustDomain           string
	ServiceAccount        string
	Network               string
	WorkloadIPs           []netip.Addr
	Protocol              Protocol
	Node                  string
	ClusterID             string
	WorkloadName          string
	WorkloadType          string
	CanonicalName         string
	CanonicalRevision     string
	Services              map[NamespacedHostname]PortMap
	Capacity              uint32
	Locality              Locality
	Status                HealthStatus
	AuthorizationPolicies []string
	MTLSMode              MTLSMode
	NetnsPath             string
	CgroupPath            string
	Waypoint              *Waypoint `json:",omitempty"`
}

// MarshalJSON encodes the workload as one flat object (workloadJSON).
func (w Workload) MarshalJSON() ([]byte, error) {
	m, l := w.Meta(), w.Locality()
	return json.Marshal(workloadJSON{
		UID: w.UID, Name: w.Name, Namespace: w.Namespace, TrustDomain: w.TrustDomain,
		ServiceAccount: w.ServiceAccount, Network: w.Network, WorkloadIPs: w.WorkloadIPs,
		Protocol: w.Protocol, Node: w.Node, ClusterID: m.ClusterID, WorkloadName: m.WorkloadName,
		WorkloadType: m.WorkloadType, CanonicalName: m.CanonicalName, CanonicalRevision: m.CanonicalRevision,
		Services: w.Services, Capacity: w.Capacity, Locality: l, Status: w.Status,
		AuthorizationPolicies: w.AuthorizationPolicies, MTLSMode: w.MTLSMode,
		NetnsPath: w.NetnsPath(), CgroupPath: w.CgroupPath(), Waypoint: w.Waypoint,
	})
}

// UnmarshalJSON decodes what MarshalJSON encodes.
func (w *Workload) UnmarshalJSON(b []byte) error {
	var j workloadJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return fmt.Errorf("decode workload: %w", err)
	}
	*w = Workload{
		UID: j.UID, Name: j.Name, Namespace: j.Namespace, TrustDomain: j.TrustDomain,
		ServiceAccount: j.ServiceAccount, Network: j.Network, WorkloadIPs: j.WorkloadIPs,
		Protocol: j.Protocol, Node: j.Node, Services: j.Services, Capacity: j.Capacity, Status: j.Status,
		AuthorizationPolicies: j.AuthorizationPolicies, MTLSMode: j.MTLSMode, Waypoint: j.Waypoint,
	}
	w.SetMeta(WorkloadMeta{ClusterID: j.ClusterID, WorkloadName: j.WorkloadName, WorkloadType: j.WorkloadType,
		CanonicalName: j.CanonicalName, CanonicalRevision: j.CanonicalRevision})
	w.SetLocality(j.Locality)
	w.SetPaths(j.NetnsPath, j.CgroupPath)
	return nil
}

// Identity returns the workload's SPIFFE ID, spiffe://<td>/ns/<ns>/sa/<sa>.
func (w *Workload) Identity() string {
	td := w.TrustDomain
	if td == "" {
		td = DefaultTrustDomain
	}
	sa := w.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	return "spiffe://" + td + "/ns/" + w.Namespace + "/sa/" + sa
}

// InMesh reports whether the workload is in the mesh (protocol HBONE).
func (w *Workload) InMesh() bool { return w.Protocol == ProtocolHBONE }

// HasIP reports whether ip is one of the workload's addresses.
func (w *Workload) HasIP(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, a := range w.WorkloadIPs {
		if a == ip {
			return true
		}
	}
	return false
}

// String identifies the workload in logs.
func (w *Workload) String() string { return w.Namespace + "/" + w.Name + " (" + w.UID + ")" }

// Service is a named set of endpoints reachable through virtual IPs.
type Service struct {
	Name      string
	Namespace string
	Hostname  string
	VIPs      []NetworkAddress
	// Ports maps service port → target port (0: the endpoint's own mapping).
	Ports PortMap
	// SubjectAltNames are identities accepted from any endpoint of this
	// service, on top of the endpoint workload's own identity.
	SubjectAltNames []string
	// Waypoint, when set, receives all traffic addressed to this service's
	// VIPs, instead of one of its endpoints. Optional; see Waypoint.
	Waypoint *Waypoint `json:",omitempty"`
	// LoadBalancing, when set, is how an endpoint is chosen (Istio's
	// workload API load balancing); nil is warren's default: locality
	// failover over region, zone and subzone among healthy endpoints.
	LoadBalancing *LoadBalancing `json:",omitempty"`
}

// LBMode is how a service's routing preference applies (Istio's
// LoadBalancing.Mode, as ztunnel applies it in src/state.rs load_balance).
type LBMode uint8

const (
	// LBStandard ignores the routing preference: any usable endpoint.
	LBStandard LBMode = iota
	// LBStrict only picks endpoints that share every scope of the routing
	// preference with the client; none means the connection fails.
	LBStrict
	// LBFailover prefers the endpoints sharing the longest prefix of the
	// routing preference with the client, then the next best, down to any.
	LBFailover
)

// String names the mode as Istio's enum does.
func (m LBMode) String() string {
	switch m {
	case LBStandard:
		return "UNSPECIFIED_MODE"
	case LBStrict:
		return "STRICT"
	case LBFailover:
		return "FAILOVER"
	}
	return fmt.Sprintf("LBMode(%d)", uint8(m))
}

// LBScope is one property a client and an endpoint may share.
type LBScope uint8

const (
	// ScopeRegion compares Locality.Region.
	ScopeRegion LBScope = iota + 1
	// ScopeZone compares Locality.Zone.
	ScopeZone
	// ScopeSubzone compares Locality.Subzone.
	ScopeSubzone
	// ScopeNode compares Workload.Node.
	ScopeNode
	// ScopeCluster compares Workload.ClusterID.
	ScopeCluster
	// ScopeNetwork compares Workload.Network.
	ScopeNetwork
)

// String names the scope as Istio's enum does.
func (s LBScope) String() string {
	switch s {
	case ScopeRegion:
		return "REGION"
	case ScopeZone:
		return "ZONE"
	case ScopeSubzone:
		return "SUBZONE"
	case ScopeNode:
		return "NODE"
	case ScopeCluster:
		return "CLUSTER"
	case ScopeNetwork:
		return "NETWORK"
	}
	return fmt.Sprintf("LBScope(%d)", uint8(s))
}

// Shared reports whether a and b are equal in scope s.
func (s LBScope) Shared(a, b *Workload) bool {
	switch s {
	case ScopeRegion:
		return a.Locality().Region == b.Locality().Region
	case ScopeZone:
		return a.Locality().Zone == b.Locality().Zone
	case ScopeSubzone:
		return a.Locality().Subzone == b.Locality().Subzone
	case ScopeNode:
		return a.Node == b.Node
	case ScopeCluster:
		return a.ClusterID() == b.ClusterID()
	case ScopeNetwork:
		return a.Network == b.Network
	}
	return false
}

// LoadBalancing is a service's endpoint selection (Istio's workload API
// LoadBalancing message).
type LoadBalancing struct {
	Mode LBMode
	// RoutingPreference lists the scopes an endpoint should share with the
	// client, most important first (ignored by LBStandard).
	RoutingPreference []LBScope
	// AllowUnhealthy also picks endpoints that are not Healthy (Istio's
	// health policy ALLOW_ALL); false is ONLY_HEALTHY.
	AllowUnhealthy bool
}

// Key returns the service's "namespace/hostname".
func (s *Service) Key() NamespacedHostname {
	return NamespacedHostname{Namespace: s.Namespace, Hostname: s.Hostname}
}

// Endpoint is a workload backing a service, with the ports it serves.
type Endpoint struct {
	Workload *Workload
	// Ports is the workload's own port map for this service (may be nil).
	Ports   PortMap
	Service *Service
}

// TargetPort returns the port to dial on the endpoint for a service port: the
// workload's own mapping if non-zero, else the service's; false if neither.
func (e Endpoint) TargetPort(servicePort uint16) (uint16, bool) {
	if p := e.Ports[servicePort]; p != 0 {
		return p, true
	}
	if p := e.Service.Ports[servicePort]; p != 0 {
		return p, true
	}
	return 0, false
}

// ExpectedIdentities returns the SPIFFE IDs an HBONE client accepts from
// this endpoint: the workload's own identity, then the service's
// subjectAltNames, without duplicates.
func (e Endpoint) ExpectedIdentities() []string {
	ids := []string{e.Workload.Identity()}
	if e.Service != nil {
		for _, san := range e.Service.SubjectAltNames {
			if !slices.Contains(ids, san) {
				ids = append(ids, san)
			}
		}
	}
	return ids
}

// MatchKind says how a StringMatch compares.
type MatchKind string

// String match kinds, as ztunnel's StringMatch and Istio's "abc", "abc*", "*abc", "*".
const (
	MatchExact    MatchKind = "Exact"
	MatchPrefix   MatchKind = "Prefix"
	MatchSuffix   MatchKind = "Suffix"
	MatchPresence MatchKind = "Presence"
)

// StringMatch matches a principal or a namespace.
type StringMatch struct {
	Kind  MatchKind
	Value string
}

// Matches reports whether s matches.
func (m StringMatch) Matches(s string) bool {
	switch m.Kind {
	case MatchExact:
		return s == m.Value
	case MatchPrefix:
		return strings.HasPrefix(s, m.Value)
	case MatchSuffix:
		return strings.HasSuffix(s, m.Value)
	case MatchPresence:
		return s != ""
	}
	return false
}

// String renders the match in Istio's pattern syntax.
func (m StringMatch) String() string {
	switch m.Kind {
	case MatchPrefix:
		return m.Value + "*"
	case MatchSuffix:
		return "*" + m.Value
	case MatchPresence:
		return "*"
	}
	return m.Value
}

// ServiceAccountMatch matches a source identity's namespace and service account exactly.
type ServiceAccountMatch struct {
	Namespace      string
	ServiceAccount string
}

// Match is a conjunction: every non-empty field must match (within a field,
// any entry; for a not- field, none of its entries). An empty Match never matches.
type Match struct {
	Namespaces          []StringMatch
	NotNamespaces       []StringMatch
	ServiceAccounts     []ServiceAccountMatch
	NotServiceAccounts  []ServiceAccountMatch
	Principals          []StringMatch
	NotPrincipals       []StringMatch
	SourceIPs           []netip.Prefix
	NotSourceIPs        []netip.Prefix
	DestinationIPs      []netip.Prefix
	NotDestinationIPs   []netip.Prefix
	DestinationPorts    []uint16
	NotDestinationPorts []uint16
}

// IsEmpty reports whether the match sets no condition at all.
func (m *Match) IsEmpty() bool {
	return len(m.Namespaces)+len(m.NotNamespaces)+len(m.ServiceAccounts)+len(m.NotServiceAccounts)+
		len(m.Principals)+len(m.NotPrincipals)+len(m.SourceIPs)+len(m.NotSourceIPs)+
		len(m.DestinationIPs)+len(m.NotDestinationIPs)+len(m.DestinationPorts)+len(m.NotDestinationPorts) == 0
}

// Clause is a disjunction of matches (Istio: the entries of one from, to or when).
type Clause []Match

// Rule is a conjunction of clauses; a rule with no clause matches everything.
type Rule []Clause

// AuthorizationPolicy is an L4 authorization policy in ztunnel's shape.
type AuthorizationPolicy struct {
	Name      string
	Namespace string
	Scope     Scope
	Action    Action
	// Rules: the policy matches when any rule matches. A policy without rules matches nothing.
	Rules []Rule
	// Invalid says, for each rule left out of Rules because it holds a value
	// that could not be parsed, which value and why. Such a rule fails
	// closed: in an ALLOW policy it matches nothing (as if absent); in a
	// DENY policy it matches every connection in the policy's scope. See
	// package istioval.
	Invalid []string `json:",omitempty"`
	// DryRun policies are evaluated and reported but never enforced.
	DryRun bool
}

// Key returns "namespace/name", the key workloads use in AuthorizationPolicies.
func (p *AuthorizationPolicy) Key() string { return p.Namespace + "/" + p.Name }

// PeerAuthentication sets the mTLS mode of a namespace or of the whole mesh
// (warren extension; Istio's PeerAuthentication without port-level settings).
type PeerAuthentication struct {
	Name      string
	Namespace string
	// Scope is ScopeGlobal (whole mesh) or ScopeNamespace.
	Scope Scope
	Mode  MTLSMode
}

// Config is the input of NewSnapshot: everything one provider knows.
type Config struct {
	Workloads           []*Workload
	Services            []*Service
	Policies            []*AuthorizationPolicy
	PeerAuthentications []*PeerAuthentication
}
