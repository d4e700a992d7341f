package kube

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/tools/cache"
)

// Names of the indexes the provider adds to the informers' stores.
const (
	// indexPodIP indexes pods by each address they hold (unmapped, as
	// netip.Addr.String writes it); hostNetwork pods are not indexed.
	indexPodIP = "warren-pod-ip"
	// indexSlicePod indexes EndpointSlices by "namespace/pod" of each
	// endpoint whose targetRef is a Pod.
	indexSlicePod = "warren-slice-pod"
	// indexSliceService indexes EndpointSlices by "namespace/service" of
	// their kubernetes.io/service-name label.
	indexSliceService = "warren-slice-service"
)

// podIndexers and sliceIndexers are the indexes the incremental path reads
// (the namespace index is the informers' own).
var (
	podIndexers = cache.Indexers{
		cache.NamespaceIndex: cache.MetaNamespaceIndexFunc,
		indexPodIP:           podIPIndex,
	}
	sliceIndexers = cache.Indexers{
		indexSlicePod:     slicePodIndex,
		indexSliceService: sliceServiceIndex,
	}
	nsIndexers = cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}
)

// podAddrs returns the pod's addresses as ipOwners reads them (the
// unparseable ones left out): PodIPs, else PodIP.
func podAddrs(pod *corev1.Pod) []netip.Addr {
	ips := pod.Status.PodIPs
	if len(ips) == 0 && pod.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: pod.Status.PodIP}}
	}
	var out []netip.Addr
	for _, pip := range ips {
		if a, err := netip.ParseAddr(pip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

func podIPIndex(obj any) ([]string, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.HostNetwork {
		return nil, nil
	}
	var out []string
	for _, a := range podAddrs(pod) {
		if s := a.String(); !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out, nil
}

// slicePods returns "namespace/pod" of each Pod endpoint of es, once each.
func slicePods(es *discoveryv1.EndpointSlice) []string {
	var out []string
	for _, ep := range es.Endpoints {
		if ep.TargetRef == nil || ep.TargetRef.Kind != "Pod" {
			continue
		}
		if k := es.Namespace + "/" + ep.TargetRef.Name; !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out
}

func slicePodIndex(obj any) ([]string, error) {
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	return slicePods(es), nil
}

func sliceServiceIndex(obj any) ([]string, error) {
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok || es.Labels[discoveryv1.LabelServiceName] == "" {
		return nil, nil
	}
	return []string{es.Namespace + "/" + es.Labels[discoveryv1.LabelServiceName]}, nil
}

// addIndexers adds the indexers in want that the informer does not have yet.
func addIndexers(inf cache.SharedIndexInformer, want cache.Indexers) error {
	have := inf.GetIndexer().GetIndexers()
	add := cache.Indexers{}
	for name, f := range want {
		if _, ok := have[name]; !ok {
			add[name] = f
		}
	}
	if len(add) == 0 {
		return nil
	}
	if err := inf.AddIndexers(add); err != nil {
		return fmt.Errorf("add indexers: %w", err)
	}
	return nil
}

// caches are the informers' stores, read by both the full conversion and
// the incremental one. Pods on this node come from localPods (full
// objects), the others from pods (the cluster-wide, slimmed cache): see
// pod. policies and peerAuths are nil when Istio's API is not served.
type caches struct {
	node       string
	namespaces cache.Indexer
	pods       cache.Indexer // podIndexers
	localPods  cache.Indexer // podIndexers
	services   cache.Indexer
	slices     cache.Indexer // sliceIndexers
	policies   cache.Indexer // nsIndexers
	peerAuths  cache.Indexer // nsIndexers
}

// nsLabels returns the labels of namespace name (nil if unknown).
func (c *caches) nsLabels(name string) map[string]string {
	obj, ok, _ := c.namespaces.GetByKey(name)
	if !ok {
		return nil
	}
	return obj.(*corev1.Namespace).Labels
}

// pod returns the pod with key "namespace/name": this node's informer's
// version if it has one, else the cluster-wide one unless that says it
// runs on this node (the local informer has not seen it yet, or no longer
// does). nil if there is none.
func (c *caches) pod(key string) *corev1.Pod {
	if obj, ok, _ := c.localPods.GetByKey(key); ok {
		return obj.(*corev1.Pod)
	}
	if obj, ok, _ := c.pods.GetByKey(key); ok {
		if pod := obj.(*corev1.Pod); pod.Spec.NodeName != c.node {
			return pod
		}
	}
	return nil
}

// podKeysBy returns the keys of the pods either cache indexes under value,
// sorted, once each.
func (c *caches) podKeysBy(index, value string) []string {
	a, _ := c.localPods.IndexKeys(index, value)
	b, _ := c.pods.IndexKeys(index, value)
	keys := slices.Concat(a, b)
	slices.Sort(keys)
	return slices.Compact(keys)
}

// allPods returns every pod as pod resolves it, in no particular order.
func (c *caches) allPods() []*corev1.Pod {
	var out []*corev1.Pod
	for _, obj := range c.localPods.List() {
		out = append(out, obj.(*corev1.Pod))
	}
	for _, obj := range c.pods.List() {
		pod := obj.(*corev1.Pod)
		if pod.Spec.NodeName == c.node {
			continue
		}
		if _, local, _ := c.localPods.GetByKey(pod.Namespace + "/" + pod.Name); !local {
			out = append(out, pod)
		}
	}
	return out
}

// local returns this node's pods.
func (c *caches) local() []*corev1.Pod {
	objs := c.localPods.List()
	out := make([]*corev1.Pod, 0, len(objs))
	for _, obj := range objs {
		out = append(out, obj.(*corev1.Pod))
	}
	return out
}

// service returns the Service with key "namespace/name", nil if none.
func (c *caches) service(key string) *corev1.Service {
	obj, ok, _ := c.services.GetByKey(key)
	if !ok {
		return nil
	}
	return obj.(*corev1.Service)
}

// slicesBy returns the EndpointSlices indexed under value, sorted by key.
func (c *caches) slicesBy(index, value string) []*discoveryv1.EndpointSlice {
	objs, _ := c.slices.ByIndex(index, value)
	out := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, obj := range objs {
		out = append(out, obj.(*discoveryv1.EndpointSlice))
	}
	return sortedByKey(out)
}

// policiesIn returns the AuthorizationPolicies of namespace ns.
func (c *caches) policiesIn(ns string) []*securityv1.AuthorizationPolicy {
	if c.policies == nil {
		return nil
	}
	objs, _ := c.policies.ByIndex(cache.NamespaceIndex, ns)
	out := make([]*securityv1.AuthorizationPolicy, 0, len(objs))
	for _, obj := range objs {
		out = append(out, obj.(*securityv1.AuthorizationPolicy))
	}
	return out
}

// policy returns the AuthorizationPolicy with key "namespace/name", nil if none.
func (c *caches) policy(key string) *securityv1.AuthorizationPolicy {
	if c.policies == nil {
		return nil
	}
	obj, ok, _ := c.policies.GetByKey(key)
	if !ok {
		return nil
	}
	return obj.(*securityv1.AuthorizationPolicy)
}

// peerAuthsIn returns the PeerAuthentications of namespace ns, or of every
// namespace when ns is "".
func (c *caches) peerAuthsIn(ns string) []*securityv1.PeerAuthentication {
	if c.peerAuths == nil {
		return nil
	}
	var objs []any
	if ns == "" {
		objs = c.peerAuths.List()
	} else {
		objs, _ = c.peerAuths.ByIndex(cache.NamespaceIndex, ns)
	}
	out := make([]*securityv1.PeerAuthentication, 0, len(objs))
	for _, obj := range objs {
		out = append(out, obj.(*securityv1.PeerAuthentication))
	}
	return out
}

// inputs returns everything, for a full conversion.
func (c *caches) inputs() Inputs {
	var in Inputs
	for _, obj := range c.namespaces.List() {
		in.Namespaces = append(in.Namespaces, obj.(*corev1.Namespace))
	}
	in.Pods = c.allPods()
	for _, obj := range c.services.List() {
		in.Services = append(in.Services, obj.(*corev1.Service))
	}
	for _, obj := range c.slices.List() {
		in.EndpointSlices = append(in.EndpointSlices, obj.(*discoveryv1.EndpointSlice))
	}
	if c.policies != nil {
		for _, obj := range c.policies.List() {
			in.Policies = append(in.Policies, obj.(*securityv1.AuthorizationPolicy))
		}
	}
	in.PeerAuthentications = c.peerAuthsIn("")
	return in
}

// splitKey splits "namespace/name".
func splitKey(key string) (ns, name string) {
	ns, name, _ = strings.Cut(key, "/")
	return ns, name
}

// sortedStrings returns the keys of set, sorted.
func sortedStrings(set map[string]bool) []string {
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
