package kube

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	securityapi "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/istioval"
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
	// skipped explains objects left out (for logs and status), by
	// skipKey.
	skipped map[string]string
}

// skipKey keys converted.skipped: "pod ns/name" or "policy ns/name".
func skipKey(kind, key string) string { return kind + " " + key }

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
	out := converted{enrolled: map[string]*corev1.Pod{}, skipped: map[string]string{}}
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
				out.skipped[skipKey("pod", pod.Namespace+"/"+pod.Name)] = pod.Namespace + "/" + pod.Name + ": " + why
			}
			continue
		}
		if other := ipConflict(pod, w, owner); other != nil {
			// An IP reused before the old pod's deletion reached the cache:
			// the newer pod owns it, the other waits for the next event.
			out.skipped[skipKey("pod", pod.Namespace+"/"+pod.Name)] = pod.Namespace + "/" + pod.Name + ": " + ipConflictWhy(other)
			continue
		}
		if InMesh(pod, nsLabels[pod.Namespace], opts.label, opts.value) {
			w.Protocol = config.ProtocolHBONE
			if pod.Spec.NodeName == opts.node {
				if n, ok := opts.netns(pod); ok {
					// The cgroup is not passed on: capture keys on the netns cookie.
					w.SetNetnsPath(n.Path)
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
	for _, es := range sortedByKey(in.EndpointSlices) { // a stable merge of their ports
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
			out.skipped[skipKey("policy", p.Namespace+"/"+p.Name)] = "AuthorizationPolicy " + p.Namespace + "/" + p.Name + ": " + why
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
	out.cfg.PeerAuthentications = peerAuthentications(in.PeerAuthentications, opts.rootNamespace)
	for _, p := range sortedByKey(in.PeerAuthentications) {
		mode := mtlsMode(p.Spec.GetMtls().GetMode())
		sel := p.Spec.GetSelector().GetMatchLabels()
		if len(sel) == 0 {
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

// peerAuthentications returns the namespace- and mesh-scoped peer
// authentications of the model (those without a workload selector and with
// a mode), sorted by key.
func peerAuthentications(in []*securityv1.PeerAuthentication, root string) []*config.PeerAuthentication {
	var out []*config.PeerAuthentication
	for _, p := range sortedByKey(in) {
		mode := mtlsMode(p.Spec.GetMtls().GetMode())
		if len(p.Spec.GetSelector().GetMatchLabels()) > 0 || mode == config.MTLSUnset {
			continue
		}
		scope := config.ScopeNamespace
		if p.Namespace == root {
			scope = config.ScopeGlobal
		}
		out = append(out, &config.PeerAuthentication{Name: p.Name, Namespace: p.Namespace, Scope: scope, Mode: mode})
	}
	return out
}

// ipConflictWhy says why a pod sharing an address with a newer one is left out.
func ipConflictWhy(other *corev1.Pod) string {
	return "IP also used by newer pod " + other.Namespace + "/" + other.Name
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
		UID:            workloadUID(opts.clusterID, pod),
		Name:           pod.Name,
		Namespace:      pod.Namespace,
		TrustDomain:    opts.trustDomain,
		ServiceAccount: sa,
		WorkloadIPs:    ips,
		Protocol:       config.ProtocolTCP,
		Node:           pod.Spec.NodeName,
		Status:         status,
		Capacity:       1,
	}
	meta := config.WorkloadMeta{
		ClusterID:         opts.clusterID,
		WorkloadName:      workloadName(pod),
		WorkloadType:      "pod",
		CanonicalName:     canonicalName(pod),
		CanonicalRevision: firstLabel(pod.Labels, "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"),
	}
	if meta.CanonicalRevision == "" {
		meta.CanonicalRevision = "latest"
	}
	w.SetMeta(meta)
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
// and policies with targetRefs (waypoints) are left out. A rule holding a
// value that cannot be parsed is recorded in Invalid and fails closed
// (package istioval).
func authorizationPolicy(p *securityv1.AuthorizationPolicy, root string) (*config.AuthorizationPolicy, labels.Selector, string) {
	spec := &p.Spec
	action, why := policyAction(spec)
	if why != "" {
		return nil, nil, why
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
	if _, unknown := fieldsSet(spec, policyFields); len(unknown) > 0 {
		// A field this warren cannot read may narrow the policy in a way
		// we would miss: fail the whole policy closed.
		ap.Invalid = []string{fmt.Sprintf("spec: fields %v are not understood by this warren", unknown)}
		return ap, selector, ""
	}
	for i, r := range spec.GetRules() {
		rule, ok, err := convertRule(r, deny)
		switch {
		case err != nil:
			ap.Invalid = append(ap.Invalid, fmt.Sprintf("rules[%d]: %v", i, err))
		case ok:
			ap.Rules = append(ap.Rules, rule)
		}
	}
	return ap, selector, ""
}

// policyAction returns the model's action for a policy, or why the policy
// is left out of the model.
func policyAction(spec *securityapi.AuthorizationPolicy) (config.Action, string) {
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return "", "targetRefs (waypoint policies) are not enforced at L4"
	}
	switch spec.GetAction() {
	case securityapi.AuthorizationPolicy_ALLOW:
		return config.ActionAllow, ""
	case securityapi.AuthorizationPolicy_DENY:
		return config.ActionDeny, ""
	}
	return "", "action " + spec.GetAction().String() + " is not supported"
}

// policySelector returns the workload selector of a policy in the model,
// nil for a policy that selects no workload by labels (namespace or mesh
// scope) or is left out of the model: what authorizationPolicy returns,
// without converting the rules.
func policySelector(p *securityv1.AuthorizationPolicy) labels.Selector {
	if _, why := policyAction(&p.Spec); why != "" {
		return nil
	}
	if sel := p.Spec.GetSelector().GetMatchLabels(); len(sel) > 0 {
		return labels.SelectorFromSet(sel)
	}
	return nil
}

// fieldUse says what the L4 conversion does with a field of Istio's
// Source, Operation or Condition messages.
type fieldUse int

const (
	// fieldL4 is converted into the model.
	fieldL4 fieldUse = iota + 1
	// fieldL7 needs attributes only a waypoint sees: an ALLOW rule that sets
	// it can never match at L4 and is dropped; a DENY rule ignores it and so
	// denies more (istiod's conversion for ztunnel does the same). Remote IP
	// blocks are L7 because they come from X-Forwarded-For or PROXY
	// headers; trust domains because istiod sends ztunnel no such match.
	fieldL7
)

// Every field of the Istio messages the conversion reads, by proto name. A
// field set on an object but missing here fails the rule closed, and
// TestIstioFieldsClassified fails when istio.io/api grows a field that is
// not classified.
var (
	sourceFields = map[protoreflect.Name]fieldUse{
		"principals": fieldL4, "not_principals": fieldL4,
		"namespaces": fieldL4, "not_namespaces": fieldL4,
		"service_accounts": fieldL4, "not_service_accounts": fieldL4,
		"ip_blocks": fieldL4, "not_ip_blocks": fieldL4,
		"request_principals": fieldL7, "not_request_principals": fieldL7,
		"remote_ip_blocks": fieldL7, "not_remote_ip_blocks": fieldL7,
		"trust_domains": fieldL7, "not_trust_domains": fieldL7,
	}
	operationFields = map[protoreflect.Name]fieldUse{
		"ports": fieldL4, "not_ports": fieldL4,
		"hosts": fieldL7, "not_hosts": fieldL7,
		"methods": fieldL7, "not_methods": fieldL7,
		"paths": fieldL7, "not_paths": fieldL7,
	}
	policyFields = map[protoreflect.Name]fieldUse{
		"selector": fieldL4, "rules": fieldL4, "action": fieldL4,
		// Policies with these are left out before the check (waypoint and
		// CUSTOM policies are not enforced by a node agent).
		"targetRef": fieldL4, "targetRefs": fieldL4, "provider": fieldL4,
	}
	ruleFields = map[protoreflect.Name]fieldUse{
		"from": fieldL4, "to": fieldL4, "when": fieldL4,
	}
	conditionFields = map[protoreflect.Name]fieldUse{
		"key": fieldL4, "values": fieldL4, "not_values": fieldL4,
	}
	// whenKeys are the condition keys enforced at L4 (Istio's list, less
	// remote.ip as for ipBlocks); every other key is L7.
	whenKeys = map[string]func(m *config.Match, values, notValues []string) error{
		"source.ip": func(m *config.Match, v, nv []string) (err error) {
			m.SourceIPs, m.NotSourceIPs, err = both("values", v, nv, istioval.IPBlock)
			return err
		},
		"source.namespace": func(m *config.Match, v, nv []string) (err error) {
			m.Namespaces, m.NotNamespaces, err = both("values", v, nv, istioval.Namespace)
			return err
		},
		"source.principal": func(m *config.Match, v, nv []string) (err error) {
			m.Principals, m.NotPrincipals, err = both("values", v, nv, istioval.Principal)
			return err
		},
		"destination.ip": func(m *config.Match, v, nv []string) (err error) {
			m.DestinationIPs, m.NotDestinationIPs, err = both("values", v, nv, istioval.IPBlock)
			return err
		},
		"destination.port": func(m *config.Match, v, nv []string) (err error) {
			m.DestinationPorts, m.NotDestinationPorts, err = both("values", v, nv, istioval.Port)
			return err
		},
	}
)

// fieldsSet reports whether msg sets an L7 field, and names the set fields
// the table does not know.
func fieldsSet(msg proto.Message, table map[protoreflect.Name]fieldUse) (l7 bool, unknown []string) {
	msg.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		switch table[fd.Name()] {
		case fieldL7:
			l7 = true
		case 0:
			unknown = append(unknown, string(fd.Name()))
		}
		return true
	})
	return l7, unknown
}

// convertRule converts one rule. ok is false when an ALLOW rule needs L7
// attributes and so can never match at L4; err names a value that cannot
// be parsed (or a field warren does not know), which fails the rule closed.
func convertRule(r *securityapi.Rule, deny bool) (rule config.Rule, ok bool, err error) {
	l7 := false
	var errs []error
	if _, unknown := fieldsSet(r, ruleFields); len(unknown) > 0 {
		errs = append(errs, fmt.Errorf("fields %v are not understood by this warren", unknown))
	}
	if len(r.GetFrom()) > 0 {
		var clause config.Clause
		for i, f := range r.GetFrom() {
			s := f.GetSource()
			at := fmt.Sprintf("from[%d].source", i)
			if s == nil || proto.Size(s) == 0 {
				errs = append(errs, fmt.Errorf("%s: empty (Istio rejects a source with no field)", at))
				continue
			}
			isL7, unknown := fieldsSet(s, sourceFields)
			l7 = l7 || isL7
			if len(unknown) > 0 {
				errs = append(errs, fmt.Errorf("%s: fields %v are not understood by this warren", at, unknown))
			}
			var m config.Match
			var e [4]error
			m.Principals, m.NotPrincipals, e[0] = both("principals", s.GetPrincipals(), s.GetNotPrincipals(), istioval.Principal)
			m.Namespaces, m.NotNamespaces, e[1] = both("namespaces", s.GetNamespaces(), s.GetNotNamespaces(), istioval.Namespace)
			m.ServiceAccounts, m.NotServiceAccounts, e[2] = both("serviceAccounts", s.GetServiceAccounts(), s.GetNotServiceAccounts(), istioval.ServiceAccount)
			m.SourceIPs, m.NotSourceIPs, e[3] = both("ipBlocks", s.GetIpBlocks(), s.GetNotIpBlocks(), istioval.IPBlock)
			if err := errors.Join(e[:]...); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", at, err))
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
		for i, t := range r.GetTo() {
			o := t.GetOperation()
			at := fmt.Sprintf("to[%d].operation", i)
			if o == nil || proto.Size(o) == 0 {
				errs = append(errs, fmt.Errorf("%s: empty (Istio rejects an operation with no field)", at))
				continue
			}
			isL7, unknown := fieldsSet(o, operationFields)
			l7 = l7 || isL7
			if len(unknown) > 0 {
				errs = append(errs, fmt.Errorf("%s: fields %v are not understood by this warren", at, unknown))
			}
			var m config.Match
			var err error
			if m.DestinationPorts, m.NotDestinationPorts, err = both("ports", o.GetPorts(), o.GetNotPorts(), istioval.Port); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", at, err))
			}
			if !m.IsEmpty() {
				clause = append(clause, m)
			}
		}
		if len(clause) > 0 {
			rule = append(rule, clause)
		}
	}
	for i, c := range r.GetWhen() {
		at := fmt.Sprintf("when[%d] (key %q)", i, c.GetKey())
		if _, unknown := fieldsSet(c, conditionFields); len(unknown) > 0 {
			errs = append(errs, fmt.Errorf("%s: fields %v are not understood by this warren", at, unknown))
		}
		if len(c.GetValues())+len(c.GetNotValues()) == 0 {
			errs = append(errs, fmt.Errorf("%s: neither values nor notValues (Istio rejects it)", at))
			continue
		}
		parse, isL4 := whenKeys[c.GetKey()]
		if !isL4 {
			l7 = true
			continue
		}
		var m config.Match
		if err := parse(&m, c.GetValues(), c.GetNotValues()); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", at, err))
			continue
		}
		rule = append(rule, config.Clause{m})
	}
	if err := errors.Join(errs...); err != nil {
		return nil, false, err
	}
	if l7 && !deny {
		return nil, false, nil
	}
	return rule, true, nil
}

// both parses a positive and a negative list of values.
// name is the positive field's name ("ipBlocks"); the negative one is
// "not" + Name ("notIpBlocks").
func both[T any](name string, values, notValues []string, parse func(string) (T, error)) ([]T, []T, error) {
	pos, err1 := istioval.List(values, parse)
	if err1 != nil {
		err1 = fmt.Errorf("%s%w", name, err1)
	}
	neg, err2 := istioval.List(notValues, parse)
	if err2 != nil {
		err2 = fmt.Errorf("not%s%w", strings.ToUpper(name[:1])+name[1:], err2)
	}
	return pos, neg, errors.Join(err1, err2)
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
