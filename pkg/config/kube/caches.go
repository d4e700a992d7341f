package kube

import (
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/tools/cache"
)

// nsIndexers is the namespace index of the stores the incremental path
// lists by namespace (the informers' own).
var nsIndexers = cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}

// objRef names an object by namespace and name, with the strings the
// cached objects hold.
type objRef struct{ ns, name string }

// refIndex maps a value (an address, a pod) to the keys of the objects of
// one store that hold it. It is a client-go index made compact: no set per
// value (most values have one key), values with no strings of their own;
// at 100,000 pods it costs about a third of the client-go indexes
// (BenchmarkRetained). The store's event handler keeps it (update), so it
// may lag the store by the events not handled yet, which the next batch
// recomputes.
type refIndex[V comparable] struct {
	values func(obj any) []V

	mu sync.RWMutex
	m  map[V][]string
}

func newRefIndex[V comparable](values func(obj any) []V) *refIndex[V] {
	return &refIndex[V]{values: values, m: map[V][]string{}}
}

// update replaces old's entries (nil: none) with obj's (nil: none).
func (x *refIndex[V]) update(old, obj any) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if old != nil {
		k, _ := cache.MetaNamespaceKeyFunc(old)
		for _, v := range x.values(old) {
			if ks := slices.DeleteFunc(x.m[v], func(s string) bool { return s == k }); len(ks) == 0 {
				delete(x.m, v)
			} else {
				x.m[v] = ks
			}
		}
	}
	if obj != nil {
		k, _ := cache.MetaNamespaceKeyFunc(obj)
		for _, v := range x.values(obj) {
			if !slices.Contains(x.m[v], k) {
				x.m[v] = append(x.m[v], k)
			}
		}
	}
}

// keys returns the keys of the objects holding v.
func (x *refIndex[V]) keys(v V) []string {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return slices.Clone(x.m[v])
}

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

// podIPs returns a pod's addresses (none for a hostNetwork pod), once each.
func podIPs(obj any) []netip.Addr {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.HostNetwork {
		return nil
	}
	return slices.Compact(slices.SortedFunc(slices.Values(podAddrs(pod)), netip.Addr.Compare))
}

// slicePodRefs returns the pods an EndpointSlice lists, once each.
func slicePodRefs(obj any) []objRef {
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil
	}
	var out []objRef
	for _, ep := range es.Endpoints {
		if ep.TargetRef == nil || ep.TargetRef.Kind != "Pod" {
			continue
		}
		if r := (objRef{es.Namespace, ep.TargetRef.Name}); !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	return out
}

// sliceServiceRef returns the service of an EndpointSlice (its
// kubernetes.io/service-name label).
func sliceServiceRef(obj any) []objRef {
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok || es.Labels[discoveryv1.LabelServiceName] == "" {
		return nil
	}
	return []objRef{{es.Namespace, es.Labels[discoveryv1.LabelServiceName]}}
}

// slicePods returns "namespace/pod" of each Pod endpoint of es, once each.
func slicePods(es *discoveryv1.EndpointSlice) []string {
	refs := slicePodRefs(es)
	out := make([]string, len(refs))
	for i, r := range refs {
		out[i] = r.ns + "/" + r.name
	}
	return out
}

// caches are the informers' stores, read by both the full conversion and
// the incremental one, and the indexes the incremental one adds. Pods on
// this node come from localPods (full objects), the others from pods (the
// cluster-wide, slimmed cache): see pod. policies and peerAuths are nil when
// Istio's API is not served. The pod, policy and peer authentication
// stores have a namespace index (nsIndexers).
type caches struct {
	node       string
	namespaces cache.Indexer
	pods       cache.Indexer
	localPods  cache.Indexer
	services   cache.Indexer
	slices     cache.Indexer
	policies   cache.Indexer
	peerAuths  cache.Indexer

	podIPs, localIPs *refIndex[netip.Addr] // pods and localPods by address
	slicePods        *refIndex[objRef]     // slices by the pods they list
	sliceServices    *refIndex[objRef]     // slices by service
}

// newCaches returns the caches over the given stores, with empty indexes.
func newCaches(node string, namespaces, pods, localPods, services, slices, policies, peerAuths cache.Indexer) *caches {
	return &caches{node: node, namespaces: namespaces, pods: pods, localPods: localPods, services: services, slices: slices,
		policies: policies, peerAuths: peerAuths,
		podIPs: newRefIndex(podIPs), localIPs: newRefIndex(podIPs),
		slicePods: newRefIndex(slicePodRefs), sliceServices: newRefIndex(sliceServiceRef)}
}

// observe updates the indexes of store for an event (old nil: added; obj
// nil: deleted). The store's event handler calls it.
func (c *caches) observe(store cache.Indexer, old, obj any) {
	switch store {
	case c.pods:
		c.podIPs.update(old, obj)
	case c.localPods:
		c.localIPs.update(old, obj)
	case c.slices:
		c.slicePods.update(old, obj)
		c.sliceServices.update(old, obj)
	}
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

// podKeysIn returns the keys of the pods of namespace ns in either store,
// sorted, once each.
func (c *caches) podKeysIn(ns string) []string {
	a, _ := c.localPods.IndexKeys(cache.NamespaceIndex, ns)
	b, _ := c.pods.IndexKeys(cache.NamespaceIndex, ns)
	keys := slices.Concat(a, b)
	slices.Sort(keys)
	return slices.Compact(keys)
}

// podKeysWith returns the keys of the pods either store holds with address
// ip, sorted, once each.
func (c *caches) podKeysWith(ip netip.Addr) []string {
	keys := slices.Concat(c.localIPs.keys(ip), c.podIPs.keys(ip))
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

// slicesBy returns the EndpointSlices x indexes under r, sorted by key.
func (c *caches) slicesBy(x *refIndex[objRef], r objRef) []*discoveryv1.EndpointSlice {
	var out []*discoveryv1.EndpointSlice
	for _, k := range x.keys(r) {
		if obj, ok, _ := c.slices.GetByKey(k); ok {
			out = append(out, obj.(*discoveryv1.EndpointSlice))
		}
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
