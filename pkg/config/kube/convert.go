package kube

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"

	securityapi "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/warren-mesh/warren/pkg/config"
)

// Label and annotation names shared with Istio ambient.
const (
	// DefaultEnrollLabel is the namespace (and pod) label that selects the data plane.
	DefaultEnrollLabel = "istio.io/dataplane-mode"
	// DefaultEnrollValue of DefaultEnrollLabel on a namespace enrolls its pods.
	DefaultEnrollValue = "ambient"
	// OptOutValue of the enrollment label on a pod keeps it out of the mesh.
	OptOutValue = "none"
	// RedirectionAnnotation marks a pod whose traffic is captured (Istio's name).
	RedirectionAnnotation = "ambient.istio.io/redirection"
	// RedirectionEnabled is RedirectionAnnotation's value on an enrolled pod.
	RedirectionEnabled = "enabled"
	// DefaultRootNamespace holds mesh-wide policies (Istio's istio-system).
	DefaultRootNamespace = "istio-system"
	// DefaultClusterID prefixes workload UIDs, as istiod's default cluster name.
	DefaultClusterID = "Kubernetes"
	// DefaultDomain is the cluster DNS domain of service hostnames.
	DefaultDomain = "cluster.local"
)

// Inputs is everything the conversion reads: snapshots of the informers'
// caches. Objects are never modified.
type Inputs struct {
	Namespaces          []*corev1.Namespace
	Pods                []*corev1.Pod
	Services            []*corev1.Service
	EndpointSlices      []*discoveryv1.EndpointSlice
	Policies            []*securityv1.AuthorizationPolicy
	PeerAuthentications []*securityv1.PeerAuthentication
}

// Netns is where a local pod's network namespace (and cgroup) was found.
type Netns struct {
	// Path is the namespace file (a /var/run/netns bind mount or /proc/<pid>/ns/net).
	Path string
	// CgroupPath is the pod's cgroup directory relative to the cgroup2 root
	// (informational: capture keys on the network namespace).
	CgroupPath string
}

// convertOptions are the parts of Options the pure conversion needs.
type convertOptions struct {
	node          string
	trustDomain   string
	clusterID     string
	domain        string
	rootNamespace string
	label, value  string
	// netns returns a local pod's namespace, false if it is not known (yet).
	netns func(pod *corev1.Pod) (Netns, bool)
}

// converted is a model and what the provider must do about it.
type converted struct {
	cfg config.Config
	// enrolled are the local pods in the mesh, by UID.
	enrolled map[string]*corev1.Pod
	// waiting are local pods that should be in the mesh but whose network
	// namespace is not found yet: they are published outside the mesh.
	waiting []*corev1.Pod
	// skipped explains objects left out (for logs and status).
	skipped []string
}

// workloadUID is the workload's UID, as istiod names pods.
func workloadUID(clusterID string, pod *corev1.Pod) string {
	return clusterID + "//Pod/" + pod.Namespace + "/" + pod.Name
}

// InMesh reports whether pod belongs in the mesh given its namespace's labels.
func InMesh(pod *corev1.Pod, nsLabels map[string]string, label, value string) bool {
	if pod.Spec.HostNetwork || pod.Labels[label] == OptOutValue {
		return false
	}
	return nsLabels[label] == value
}

// convert builds the model. It is pure: all I/O sits behind opts.netns.
func convert(in Inputs, opts convertOptions) converted {
	out := converted{enrolled: map[string]*corev1.Pod{}}
	nsLabels := map[string]map[string]string{}
	for _, ns := range in.Namespaces {
		nsLabels[ns.Name] = ns.Labels
	}

	// Pods → workloads, sorted for a stable model.
	pods := slices.Clone(in.Pods)
	sort.Slice(pods, func(i, j int) bool {
		return pods[i].Namespace+"/"+pods[i].Name < pods[j].Namespace+"/"+pods[j].Name
	})
	byPodKey := map[string]*config.Workload{}
	byNS := map[string][]*podWorkload{}
	owner := ipOwners(pods)
	for _, pod := range pods {
		w, why := podWorkload1(pod, opts)
		if w == nil {
			if why != "" {
				out.skipped = append(out.skipped, pod.Namespace+"/"+pod.Name+": "+why)
			}
			continue
		}
		if other := ipConflict(pod, w, owner); other != nil {
			// An IP reused before the old pod's deletion reached the cache:
			// the newer pod owns it, the other waits for the next event.
			out.skipped = append(out.skipped, fmt.Sprintf("%s/%s: IP also used by newer pod %s/%s", pod.Namespace, pod.Name, other.Namespace, other.Name))
			continue
		}
		if InMesh(pod, nsLabels[pod.Namespace], opts.label, opts.value) {
			w.Protocol = config.ProtocolHBONE
			if pod.Spec.NodeName == opts.node {
				if n, ok := opts.netns(pod); ok {
					// The cgroup is not passed on: capture keys on the netns cookie.
					w.NetnsPath = n.Path
					out.enrolled[string(pod.UID)] = pod
				} else {
					// Not enrollable yet: outside the mesh until found (see package doc).
					w.Protocol = config.ProtocolTCP
					out.waiting = append(out.waiting, pod)
				}
			}
		}
		out.cfg.Workloads = append(out.cfg.Workloads, w)
		byPodKey[pod.Namespace+"/"+pod.Name] = w
		byNS[pod.Namespace] = append(byNS[pod.Namespace], &podWorkload{pod, w})
	}

	// Services and their endpoints.
	svcs := map[string]*corev1.Service{}
	for _, s := range in.Services {
		svc := service(s, opts.domain)
		if svc == nil {
			continue
		}
		svcs[s.Namespace+"/"+s.Name] = s
		out.cfg.Services = append(out.cfg.Services, svc)
	}
	sort.Slice(out.cfg.Services, func(i, j int) bool {
		return out.cfg.Services[i].Key().String() < out.cfg.Services[j].Key().String()
	})
	for _, es := range in.EndpointSlices {
		name := es.Labels[discoveryv1.LabelServiceName]
		s, ok := svcs[es.Namespace+"/"+name]
		if !ok {
			continue
		}
		key := config.NamespacedHostname{Namespace: s.Namespace, Hostname: hostname(s, opts.domain)}
		ports := endpointPorts(s, es)
		for _, ep := range es.Endpoints {
			if ep.TargetRef == nil || ep.TargetRef.Kind != "Pod" {
				continue
			}
			w := byPodKey[es.Namespace+"/"+ep.TargetRef.Name]
			if w == nil {
				continue
			}
			if w.Services == nil {
				w.Services = map[config.NamespacedHostname]config.PortMap{}
			}
			pm := w.Services[key]
			if pm == nil {
				pm = config.PortMap{}
				w.Services[key] = pm
			}
			for sp, tp := range ports {
				pm[sp] = tp
			}
		}
	}

	// Authorization policies.
	for _, p := range sortedByKey(in.Policies) {
		ap, selector, why := authorizationPolicy(p, opts.rootNamespace)
		if ap == nil {
			out.skipped = append(out.skipped, "AuthorizationPolicy "+p.Namespace+"/"+p.Name+": "+why)
			continue
		}
		out.cfg.Policies = append(out.cfg.Policies, ap)
		if selector == nil {
			continue
		}
		for _, pw := range selected(byNS, p.Namespace, opts.rootNamespace) {
			if selector.Matches(labels.Set(pw.pod.Labels)) {
				pw.w.AuthorizationPolicies = append(pw.w.AuthorizationPolicies, ap.Key())
			}
		}
	}

	// Peer authentications: namespace and mesh scope in the model, workload
	// selectors as per-workload modes (the most specific wins, as in Istio).
	for _, p := range sortedByKey(in.PeerAuthentications) {
		mode := mtlsMode(p.Spec.GetMtls().GetMode())
		sel := p.Spec.GetSelector().GetMatchLabels()
		if len(sel) == 0 {
			if mode == config.MTLSUnset {
				continue
			}
			scope := config.ScopeNamespace
			if p.Namespace == opts.rootNamespace {
				scope = config.ScopeGlobal
			}
			out.cfg.PeerAuthentications = append(out.cfg.PeerAuthentications,
				&config.PeerAuthentication{Name: p.Name, Namespace: p.Namespace, Scope: scope, Mode: mode})
			continue
		}
		selector := labels.SelectorFromSet(sel)
		for _, pw := range byNS[p.Namespace] {
			if mode != config.MTLSUnset && selector.Matches(labels.Set(pw.pod.Labels)) {
				pw.w.MTLSMode = mode
			}
		}
	}
	return out
}

// ipOwners maps each pod IP to the newest pod using it.
func ipOwners(pods []*corev1.Pod) map[netip.Addr]*corev1.Pod {
	owner := map[netip.Addr]*corev1.Pod{}
	for _, pod := range pods {
		if pod.Spec.HostNetwork {
			continue
		}
		ips := pod.Status.PodIPs
		if len(ips) == 0 && pod.Status.PodIP != "" {
			ips = []corev1.PodIP{{IP: pod.Status.PodIP}}
		}
		for _, pip := range ips {
			a, err := netip.ParseAddr(pip.IP)
			if err != nil {
				continue
			}
			a = a.Unmap()
			if prev, ok := owner[a]; !ok || newer(pod, prev) {
				owner[a] = pod
			}
		}
	}
	return owner
}

// newer orders pods by creation, then by name for a stable choice.
func newer(a, b *corev1.Pod) bool {
	if !a.CreationTimestamp.Equal(&b.CreationTimestamp) {
		return b.CreationTimestamp.Before(&a.CreationTimestamp)
	}
	return a.Namespace+"/"+a.Name > b.Namespace+"/"+b.Name
}

// ipConflict returns the pod that owns one of w's IPs instead of pod, or nil.
func ipConflict(pod *corev1.Pod, w *config.Workload, owner map[netip.Addr]*corev1.Pod) *corev1.Pod {
	for _, a := range w.WorkloadIPs {
		if o, ok := owner[a]; ok && o != pod {
			return o
		}
	}
	return nil
}

type podWorkload struct {
	pod *corev1.Pod
	w   *config.Workload
}

// selected returns the workloads a selector-scoped policy in ns may select:
// its namespace's, or every namespace's for the root namespace.
func selected(byNS map[string][]*podWorkload, ns, root string) []*podWorkload {
	if ns != root {
		return byNS[ns]
	}
	var all []*podWorkload
	for _, k := range sortedKeys(byNS) {
		all = append(all, byNS[k]...)
	}
	return all
}

// podWorkload1 converts a pod; nil with a reason when it is not a workload.
func podWorkload1(pod *corev1.Pod, opts convertOptions) (*config.Workload, string) {
	if pod.Spec.HostNetwork {
		return nil, "" // shares the node's address: never a workload
	}
	if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed || pod.DeletionTimestamp != nil {
		return nil, ""
	}
	var ips []netip.Addr
	for _, pip := range pod.Status.PodIPs {
		a, err := netip.ParseAddr(pip.IP)
		if err != nil {
			return nil, fmt.Sprintf("pod IP %q: %v", pip.IP, err)
		}
		ips = append(ips, a.Unmap())
	}
	if len(ips) == 0 && pod.Status.PodIP != "" {
		a, err := netip.ParseAddr(pod.Status.PodIP)
		if err != nil {
			return nil, fmt.Sprintf("pod IP %q: %v", pod.Status.PodIP, err)
		}
		ips = append(ips, a.Unmap())
	}
	if len(ips) == 0 {
		return nil, "" // no IP yet: not addressable
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	status := config.Unhealthy
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			status = config.Healthy
		}
	}
	w := &config.Workload{
		UID:               workloadUID(opts.clusterID, pod),
		Name:              pod.Name,
		Namespace:         pod.Namespace,
		TrustDomain:       opts.trustDomain,
		ServiceAccount:    sa,
		WorkloadIPs:       ips,
		Protocol:          config.ProtocolTCP,
		Node:              pod.Spec.NodeName,
		ClusterID:         opts.clusterID,
		WorkloadName:      workloadName(pod),
		WorkloadType:      "pod",
		CanonicalName:     canonicalName(pod),
		CanonicalRevision: firstLabel(pod.Labels, "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"),
		Status:            status,
		Capacity:          1,
	}
	if w.CanonicalRevision == "" {
		w.CanonicalRevision = "latest"
	}
	return w, ""
}

func canonicalName(pod *corev1.Pod) string {
	if n := firstLabel(pod.Labels, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app"); n != "" {
		return n
	}
	return workloadName(pod)
}

// workloadName is the pod's controller name: a Deployment's pods are owned
// by a ReplicaSet "<deployment>-<hash>", whose hash label is stripped.
func workloadName(pod *corev1.Pod) string {
	for _, ref := range pod.OwnerReferences {
		if ref.Controller == nil || !*ref.Controller {
			continue
		}
		if ref.Kind == "ReplicaSet" {
			if h := pod.Labels["pod-template-hash"]; h != "" {
				return strings.TrimSuffix(ref.Name, "-"+h)
			}
		}
		return ref.Name
	}
	return pod.Name
}

func firstLabel(l map[string]string, keys ...string) string {
	for _, k := range keys {
		if v := l[k]; v != "" {
			return v
		}
	}
	return ""
}

func hostname(s *corev1.Service, domain string) string {
	return s.Name + "." + s.Namespace + ".svc." + domain
}

// service converts a Service with cluster IPs; headless and ExternalName
// services have no VIP and are left out (their pods are reached directly).
func service(s *corev1.Service, domain string) *config.Service {
	if s.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	ips := s.Spec.ClusterIPs
	if len(ips) == 0 && s.Spec.ClusterIP != "" {
		ips = []string{s.Spec.ClusterIP}
	}
	svc := &config.Service{Name: s.Name, Namespace: s.Namespace, Hostname: hostname(s, domain), Ports: config.PortMap{}}
	for _, ip := range ips {
		if ip == "" || ip == corev1.ClusterIPNone {
			continue
		}
		a, err := netip.ParseAddr(ip)
		if err != nil {
			continue
		}
		svc.VIPs = append(svc.VIPs, config.NetworkAddress{Addr: a.Unmap()})
	}
	if len(svc.VIPs) == 0 {
		return nil
	}
	for _, p := range s.Spec.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			continue
		}
		// A numeric targetPort is the service's; a named one (0 here) is
		// resolved per endpoint from the EndpointSlice.
		var tp uint16
		if p.TargetPort.IntVal > 0 && p.TargetPort.StrVal == "" {
			tp = uint16(p.TargetPort.IntVal)
		} else if p.TargetPort.IntVal == 0 && p.TargetPort.StrVal == "" {
			tp = uint16(p.Port)
		}
		svc.Ports[uint16(p.Port)] = tp
	}
	return svc
}

// endpointPorts maps the service's TCP ports to the ports an EndpointSlice
// gives for them (matched by port name, as kube-proxy does).
func endpointPorts(s *corev1.Service, es *discoveryv1.EndpointSlice) config.PortMap {
	pm := config.PortMap{}
	for _, sp := range s.Spec.Ports {
		if sp.Protocol != "" && sp.Protocol != corev1.ProtocolTCP {
			continue
		}
		for _, ep := range es.Ports {
			if ep.Port == nil || (ep.Protocol != nil && *ep.Protocol != corev1.ProtocolTCP) {
				continue
			}
			name := ""
			if ep.Name != nil {
				name = *ep.Name
			}
			if name == sp.Name {
				pm[uint16(sp.Port)] = uint16(*ep.Port)
			}
		}
	}
	return pm
}

// authorizationPolicy converts an Istio AuthorizationPolicy to ztunnel's L4
// shape, as istiod does for ztunnel: an ALLOW rule that needs L7 attributes
// can never match at L4 and is dropped; a DENY rule's L7 attributes are
// ignored, so it denies more rather than less. AUDIT and CUSTOM policies
// and policies with targetRefs (waypoints) are left out.
func authorizationPolicy(p *securityv1.AuthorizationPolicy, root string) (*config.AuthorizationPolicy, labels.Selector, string) {
	spec := &p.Spec
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return nil, nil, "targetRefs (waypoint policies) are not enforced at L4"
	}
	var action config.Action
	switch spec.GetAction() {
	case securityapi.AuthorizationPolicy_ALLOW:
		action = config.ActionAllow
	case securityapi.AuthorizationPolicy_DENY:
		action = config.ActionDeny
	default:
		return nil, nil, "action " + spec.GetAction().String() + " is not supported"
	}
	ap := &config.AuthorizationPolicy{Name: p.Name, Namespace: p.Namespace, Action: action,
		DryRun: p.Annotations["istio.io/dry-run"] == "true"}
	var selector labels.Selector
	switch sel := spec.GetSelector().GetMatchLabels(); {
	case len(sel) > 0:
		ap.Scope = config.ScopeWorkloadSelector
		selector = labels.SelectorFromSet(sel)
	case p.Namespace == root:
		ap.Scope = config.ScopeGlobal
	default:
		ap.Scope = config.ScopeNamespace
	}
	deny := action == config.ActionDeny
	for _, r := range spec.GetRules() {
		if rule, ok := convertRule(r, deny); ok {
			ap.Rules = append(ap.Rules, rule)
		}
	}
	return ap, selector, ""
}

// convertRule returns false when the rule cannot match at L4.
func convertRule(r *securityapi.Rule, deny bool) (config.Rule, bool) {
	rule := config.Rule{}
	l7 := false
	if len(r.GetFrom()) > 0 {
		var clause config.Clause
		for _, f := range r.GetFrom() {
			s := f.GetSource()
			if s == nil {
				continue
			}
			if len(s.GetRequestPrincipals())+len(s.GetNotRequestPrincipals())+len(s.GetTrustDomains())+len(s.GetNotTrustDomains()) > 0 {
				l7 = true
			}
			m := config.Match{
				Principals:         patterns(s.GetPrincipals(), true),
				NotPrincipals:      patterns(s.GetNotPrincipals(), true),
				Namespaces:         patterns(s.GetNamespaces(), false),
				NotNamespaces:      patterns(s.GetNotNamespaces(), false),
				ServiceAccounts:    serviceAccounts(s.GetServiceAccounts()),
				NotServiceAccounts: serviceAccounts(s.GetNotServiceAccounts()),
				SourceIPs:          prefixes(append(slices.Clone(s.GetIpBlocks()), s.GetRemoteIpBlocks()...)),
				NotSourceIPs:       prefixes(append(slices.Clone(s.GetNotIpBlocks()), s.GetNotRemoteIpBlocks()...)),
			}
			if !m.IsEmpty() {
				clause = append(clause, m)
			}
		}
		if len(clause) > 0 {
			rule = append(rule, clause)
		}
	}
	if len(r.GetTo()) > 0 {
		var clause config.Clause
		for _, t := range r.GetTo() {
			o := t.GetOperation()
			if o == nil {
				continue
			}
			if len(o.GetHosts())+len(o.GetNotHosts())+len(o.GetMethods())+len(o.GetNotMethods())+len(o.GetPaths())+len(o.GetNotPaths()) > 0 {
				l7 = true
			}
			m := config.Match{DestinationPorts: ports(o.GetPorts()), NotDestinationPorts: ports(o.GetNotPorts())}
			if !m.IsEmpty() {
				clause = append(clause, m)
			}
		}
		if len(clause) > 0 {
			rule = append(rule, clause)
		}
	}
	for _, c := range r.GetWhen() {
		var m config.Match
		switch c.GetKey() {
		case "source.ip", "remote.ip":
			m.SourceIPs, m.NotSourceIPs = prefixes(c.GetValues()), prefixes(c.GetNotValues())
		case "source.namespace":
			m.Namespaces, m.NotNamespaces = patterns(c.GetValues(), false), patterns(c.GetNotValues(), false)
		case "source.principal":
			m.Principals, m.NotPrincipals = patterns(c.GetValues(), true), patterns(c.GetNotValues(), true)
		case "destination.ip":
			m.DestinationIPs, m.NotDestinationIPs = prefixes(c.GetValues()), prefixes(c.GetNotValues())
		case "destination.port":
			m.DestinationPorts, m.NotDestinationPorts = ports(c.GetValues()), ports(c.GetNotValues())
		default:
			l7 = true
			continue
		}
		if !m.IsEmpty() {
			rule = append(rule, config.Clause{m})
		}
	}
	if l7 && !deny {
		return nil, false
	}
	return rule, true
}

func patterns(in []string, principal bool) []config.StringMatch {
	var out []config.StringMatch
	for _, s := range in {
		m := config.ParseStringMatch(s)
		if principal && (m.Kind == config.MatchExact || m.Kind == config.MatchPrefix) {
			m.Value = strings.TrimPrefix(m.Value, "spiffe://")
		}
		out = append(out, m)
	}
	return out
}

func serviceAccounts(in []string) []config.ServiceAccountMatch {
	var out []config.ServiceAccountMatch
	for _, s := range in {
		if ns, sa, ok := strings.Cut(s, "/"); ok {
			out = append(out, config.ServiceAccountMatch{Namespace: ns, ServiceAccount: sa})
		}
	}
	return out
}

func prefixes(in []string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range in {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
		} else if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
		}
	}
	return out
}

func ports(in []string) []uint16 {
	var out []uint16
	for _, s := range in {
		if n, err := strconv.ParseUint(s, 10, 16); err == nil && n > 0 {
			out = append(out, uint16(n))
		}
	}
	return out
}

func mtlsMode(m securityapi.PeerAuthentication_MutualTLS_Mode) config.MTLSMode {
	switch m {
	case securityapi.PeerAuthentication_MutualTLS_STRICT:
		return config.MTLSStrict
	case securityapi.PeerAuthentication_MutualTLS_PERMISSIVE, securityapi.PeerAuthentication_MutualTLS_DISABLE:
		// warren has no "plaintext only" mode: DISABLE accepts plaintext, as PERMISSIVE.
		return config.MTLSPermissive
	}
	return config.MTLSUnset
}

type keyed interface {
	GetNamespace() string
	GetName() string
}

func sortedByKey[T keyed](in []T) []T {
	out := slices.Clone(in)
	sort.Slice(out, func(i, j int) bool {
		return out[i].GetNamespace()+"/"+out[i].GetName() < out[j].GetNamespace()+"/"+out[j].GetName()
	})
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
