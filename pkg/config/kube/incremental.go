package kube

import (
	"errors"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"

	"github.com/warren-mesh/warren/pkg/config"
)

// The incremental path. Informer events are recorded as the keys they may
// change (changes); each debounced batch recomputes only the model items
// those keys reach, each from the informer caches alone (caches.workload,
// the per-pod form of convert), compares it with the item in the last
// applied snapshot, and applies the differences as one config.Delta. The
// snapshot is the only copy of the converted model.
//
// What an event reaches:
//   - a Pod: its workload, and the workloads of the pods sharing one of its
//     old or new addresses (the newest pod owns an address);
//   - a Namespace whose enrollment label value changes: its pods;
//   - a Service: the service, and the pods its EndpointSlices list;
//   - an EndpointSlice: the pods its old and new versions list;
//   - an AuthorizationPolicy: the policy, and the pods its old or new
//     selector matches (in its namespace; in every namespace for the root
//     namespace's);
//   - a PeerAuthentication: the namespace and mesh modes, and the pods its
//     old or new selector matches in its namespace.
//
// A batch also recomputes this node's pods whose network namespace was
// found or lost (outside the informers).

// changes are the keys informer events may have changed since the last batch.
type changes struct {
	pods       map[string]bool // "namespace/name"
	ips        map[netip.Addr]bool
	namespaces map[string]bool // names
	services   map[string]bool // "namespace/name" of Services
	policies   map[string]bool // "namespace/name" of AuthorizationPolicies
	peerAuths  bool
	// selectors of the changed policies and peer authentications (each
	// version seen): the pods they match are recomputed.
	selectors []scopedSelector
}

// scopedSelector is a policy's workload selector and where it selects: ns,
// or every namespace when ns is "".
type scopedSelector struct {
	ns  string
	sel map[string]string
}

func setAdd(m *map[string]bool, k string) {
	if *m == nil {
		*m = map[string]bool{}
	}
	(*m)[k] = true
}

func addrAdd(m *map[netip.Addr]bool, a netip.Addr) {
	if *m == nil {
		*m = map[netip.Addr]bool{}
	}
	(*m)[a] = true
}

// merge adds o's keys to c.
func (c *changes) merge(o *changes) {
	c.peerAuths = c.peerAuths || o.peerAuths
	for a := range o.ips {
		addrAdd(&c.ips, a)
	}
	for _, pair := range []struct {
		dst *map[string]bool
		src map[string]bool
	}{
		{&c.pods, o.pods}, {&c.namespaces, o.namespaces}, {&c.services, o.services}, {&c.policies, o.policies},
	} {
		for k := range pair.src {
			setAdd(pair.dst, k)
		}
	}
	c.selectors = append(c.selectors, o.selectors...)
}

// record notes what an event may change: old is the object's previous
// version (nil when added), cur its new one (nil when deleted). root is the
// mesh-wide policies' namespace; label and value are the enrollment label.
func (c *changes) record(old, cur any, root, label, value string) {
	obj := cur
	if obj == nil {
		obj = old
	}
	switch o := obj.(type) {
	case *corev1.Pod:
		setAdd(&c.pods, o.Namespace+"/"+o.Name)
		for _, v := range []any{old, cur} {
			if pod, ok := v.(*corev1.Pod); ok {
				for _, a := range podAddrs(pod) {
					addrAdd(&c.ips, a)
				}
			}
		}
	case *corev1.Namespace:
		enrolled := func(v any) bool {
			ns, ok := v.(*corev1.Namespace)
			return ok && ns.Labels[label] == value
		}
		if old == nil || cur == nil || enrolled(old) != enrolled(cur) {
			setAdd(&c.namespaces, o.Name)
		}
	case *corev1.Service:
		setAdd(&c.services, o.Namespace+"/"+o.Name)
	case *discoveryv1.EndpointSlice:
		for _, v := range []any{old, cur} {
			if es, ok := v.(*discoveryv1.EndpointSlice); ok {
				for _, k := range slicePods(es) {
					setAdd(&c.pods, k)
				}
			}
		}
	case *securityv1.AuthorizationPolicy:
		setAdd(&c.policies, o.Namespace+"/"+o.Name)
		for _, v := range []any{old, cur} {
			if p, ok := v.(*securityv1.AuthorizationPolicy); ok {
				if sel := p.Spec.GetSelector().GetMatchLabels(); len(sel) > 0 {
					ns := p.Namespace
					if ns == root {
						ns = ""
					}
					c.selectors = append(c.selectors, scopedSelector{ns, sel})
				}
			}
		}
	case *securityv1.PeerAuthentication:
		c.peerAuths = true
		for _, v := range []any{old, cur} {
			if p, ok := v.(*securityv1.PeerAuthentication); ok {
				if sel := p.Spec.GetSelector().GetMatchLabels(); len(sel) > 0 {
					c.selectors = append(c.selectors, scopedSelector{p.Namespace, sel})
				}
			}
		}
	}
}

// events gathers the changes of informer events between batches; the
// handlers run on the informers' goroutines.
type events struct {
	root, label, value string

	mu sync.Mutex
	ch changes
}

// add records an event: old is nil for an addition, obj nil for a deletion.
func (e *events) add(old, obj any) {
	if d, ok := old.(cache.DeletedFinalStateUnknown); ok {
		old = d.Obj
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.ch.record(old, obj, e.root, e.label, e.value)
}

// take returns the changes recorded since the last take, and forgets them.
func (e *events) take() changes {
	e.mu.Lock()
	defer e.mu.Unlock()
	ch := e.ch
	e.ch = changes{}
	return ch
}

// again puts back changes to retry with the next batch.
func (e *events) again(ch *changes) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.ch.merge(ch)
}

// podState is what a pod is to this node.
type podState int

const (
	podOther    podState = iota
	podEnrolled          // local, in the mesh, network namespace found
	podWaiting           // local, belongs in the mesh, network namespace not found yet
)

// workload converts one pod from the caches exactly as convert does within
// the whole model: nil with a reason (maybe "") when it is no workload.
func (c *caches) workload(pod *corev1.Pod, opts convertOptions) (*config.Workload, string, podState) {
	w, why := podWorkload1(pod, opts)
	if w == nil {
		return nil, why, podOther
	}
	key := pod.Namespace + "/" + pod.Name
	for _, a := range w.WorkloadIPs {
		if o := c.ipOwner(a); o != nil && o.Namespace+"/"+o.Name != key {
			return nil, ipConflictWhy(o), podOther
		}
	}
	state := podOther
	if InMesh(pod, c.nsLabels(pod.Namespace), opts.label, opts.value) {
		w.Protocol = config.ProtocolHBONE
		if pod.Spec.NodeName == opts.node {
			if n, ok := opts.netns(pod); ok {
				w.SetNetnsPath(n.Path)
				state = podEnrolled
			} else {
				w.Protocol = config.ProtocolTCP
				state = podWaiting
			}
		}
	}

	for _, es := range c.slicesBy(c.slicePods, objRef{pod.Namespace, pod.Name}) {
		s := c.service(es.Namespace + "/" + es.Labels[discoveryv1.LabelServiceName])
		if s == nil || service(s, opts.domain) == nil {
			continue
		}
		if !slices.ContainsFunc(es.Endpoints, func(ep discoveryv1.Endpoint) bool {
			return ep.TargetRef != nil && ep.TargetRef.Kind == "Pod" && ep.TargetRef.Name == pod.Name
		}) {
			continue
		}
		if w.Services == nil {
			w.Services = map[config.NamespacedHostname]config.PortMap{}
		}
		skey := config.NamespacedHostname{Namespace: s.Namespace, Hostname: hostname(s, opts.domain)}
		pm := w.Services[skey]
		if pm == nil {
			pm = config.PortMap{}
			w.Services[skey] = pm
		}
		for sp, tp := range endpointPorts(s, es) {
			pm[sp] = tp
		}
	}

	aps := c.policiesIn(pod.Namespace)
	if pod.Namespace != opts.rootNamespace {
		aps = append(aps, c.policiesIn(opts.rootNamespace)...)
	}
	set := labels.Set(pod.Labels)
	for _, p := range sortedByKey(aps) {
		if sel := policySelector(p); sel != nil && sel.Matches(set) {
			w.AuthorizationPolicies = append(w.AuthorizationPolicies, p.Namespace+"/"+p.Name)
		}
	}
	for _, p := range sortedByKey(c.peerAuthsIn(pod.Namespace)) {
		mode := mtlsMode(p.Spec.GetMtls().GetMode())
		sel := p.Spec.GetSelector().GetMatchLabels()
		if len(sel) > 0 && mode != config.MTLSUnset && labels.SelectorFromSet(sel).Matches(set) {
			w.MTLSMode = mode
		}
	}
	return w, "", state
}

// ipOwner returns the newest pod holding address ip (as ipOwners decides), nil if none.
func (c *caches) ipOwner(ip netip.Addr) *corev1.Pod {
	var owner *corev1.Pod
	for _, k := range c.podKeysWith(ip) {
		pod := c.pod(k)
		if pod == nil || pod.Spec.HostNetwork || !slices.Contains(podAddrs(pod), ip) {
			continue
		}
		if owner == nil || newer(pod, owner) {
			owner = pod
		}
	}
	return owner
}

// model is the provider's converted state between batches: the last applied
// snapshot (the only copy of the model) and what the status reports about
// items left out.
type model struct {
	c    *caches
	conv convertOptions
	snap *config.Snapshot
	// skipped explains objects left out, by skipKey.
	skipped map[string]string
	// invalid holds the rules of each policy that fail closed.
	invalid map[string][]string
	// local is the state of each of this node's pods that is enrolled or
	// waits, by "namespace/name".
	local map[string]podState
}

// step is the outcome of one batch.
type step struct {
	delta config.Delta
	// enrolled and waiting are this node's pods (see converted).
	enrolled map[string]*corev1.Pod
	waiting  []*corev1.Pod
	// keys maps a delta item (Rejection's kind and key) to the change that
	// redoes it.
	keys map[[2]string]func(*changes)
}

// reset takes the result of a full conversion, published as snap.
func (m *model) reset(out *converted, snap *config.Snapshot) {
	m.snap, m.skipped = snap, out.skipped
	m.local = map[string]podState{}
	for _, pod := range out.enrolled {
		m.local[pod.Namespace+"/"+pod.Name] = podEnrolled
	}
	for _, pod := range out.waiting {
		m.local[pod.Namespace+"/"+pod.Name] = podWaiting
	}
	m.invalid = map[string][]string{}
	for _, ap := range out.cfg.Policies {
		if len(ap.Invalid) > 0 {
			m.invalid[ap.Key()] = ap.Invalid
		}
	}
}

// diff recomputes what ch reaches and returns the delta from m.snap, with
// the states of this node's pods (local; a local pod whose network
// namespace was found or lost must be in ch).
func (m *model) diff(ch *changes, local []*corev1.Pod) *step {
	c, opts := m.c, m.conv
	st := &step{enrolled: map[string]*corev1.Pod{}, keys: map[[2]string]func(*changes){}}
	d := &st.delta

	pods := map[string]bool{}
	ips := maps.Clone(ch.ips)
	for k := range ch.pods {
		pods[k] = true
		// Which informer's version of the pod counts may have changed with
		// the event (see caches.pod): the other version's addresses too.
		for _, store := range []cache.Indexer{c.pods, c.localPods} {
			if obj, ok, _ := store.GetByKey(k); ok {
				for _, a := range podAddrs(obj.(*corev1.Pod)) {
					addrAdd(&ips, a)
				}
			}
		}
	}
	for ip := range ips {
		for _, k := range c.podKeysWith(ip) {
			pods[k] = true
		}
	}
	for ns := range ch.namespaces {
		for _, k := range c.podKeysIn(ns) {
			pods[k] = true
		}
	}
	for key := range ch.services {
		ns, name := splitKey(key)
		for _, es := range c.slicesBy(c.sliceServices, objRef{ns, name}) {
			for _, k := range slicePods(es) {
				pods[k] = true
			}
		}
	}
	m.selected(ch.selectors, pods)

	for _, key := range sortedStrings(ch.services) {
		ns, name := splitKey(key)
		skey := config.NamespacedHostname{Namespace: ns, Hostname: name + "." + ns + ".svc." + opts.domain}
		var svc *config.Service
		if s := c.service(key); s != nil {
			svc = service(s, opts.domain)
		}
		old, had := m.snap.ServiceByKey(skey)
		switch {
		case svc == nil && had:
			d.RemovedServices = append(d.RemovedServices, skey)
		case svc != nil && (!had || !reflect.DeepEqual(old, svc)):
			d.Services = append(d.Services, svc)
		default:
			continue
		}
		st.keys[[2]string{"service", skey.String()}] = func(r *changes) { setAdd(&r.services, key) }
	}

	for _, key := range sortedStrings(ch.policies) {
		var ap *config.AuthorizationPolicy
		delete(m.skipped, skipKey("policy", key))
		delete(m.invalid, key)
		if p := c.policy(key); p != nil {
			var why string
			if ap, _, why = authorizationPolicy(p, opts.rootNamespace); ap == nil {
				m.skipped[skipKey("policy", key)] = "AuthorizationPolicy " + key + ": " + why
			} else if len(ap.Invalid) > 0 {
				m.invalid[key] = ap.Invalid
			}
		}
		old, had := m.snap.Policy(key)
		switch {
		case ap == nil && had:
			d.RemovedPolicies = append(d.RemovedPolicies, key)
		case ap != nil && (!had || !reflect.DeepEqual(old, ap)):
			d.Policies = append(d.Policies, ap)
		default:
			continue
		}
		st.keys[[2]string{"policy", key}] = func(r *changes) { setAdd(&r.policies, key) }
	}

	if ch.peerAuths {
		pas := peerAuthentications(c.peerAuthsIn(""), opts.rootNamespace)
		if !reflect.DeepEqual(pas, m.snap.PeerAuthentications()) {
			d.PeerAuthentications, d.SetPeerAuthentications = pas, true
			st.keys[[2]string{"peerAuthentications", "*"}] = func(r *changes) { r.peerAuths = true }
		}
	}

	for _, key := range sortedStrings(pods) {
		uid := opts.clusterID + "//Pod/" + key
		var w *config.Workload
		delete(m.skipped, skipKey("pod", key))
		if pod := c.pod(key); pod != nil {
			var why string
			var state podState
			w, why, state = c.workload(pod, opts)
			if why != "" {
				m.skipped[skipKey("pod", key)] = key + ": " + why
			}
			if state != podOther {
				m.local[key] = state
			} else {
				delete(m.local, key)
			}
		} else {
			delete(m.local, key)
		}
		old, had := m.snap.WorkloadByUID(uid)
		switch {
		case w == nil && had:
			d.RemovedWorkloads = append(d.RemovedWorkloads, uid)
		case w != nil && (!had || !reflect.DeepEqual(old, w)):
			d.Workloads = append(d.Workloads, w)
		default:
			continue
		}
		st.keys[[2]string{"workload", uid}] = func(r *changes) { setAdd(&r.pods, key) }
	}
	for _, pod := range local {
		switch m.local[pod.Namespace+"/"+pod.Name] {
		case podEnrolled:
			st.enrolled[string(pod.UID)] = pod
		case podWaiting:
			st.waiting = append(st.waiting, pod)
		}
	}
	return st
}

// selected adds to pods the keys of the pods the selectors match.
func (m *model) selected(sels []scopedSelector, pods map[string]bool) {
	if len(sels) == 0 {
		return
	}
	byNS := map[string][]labels.Selector{}
	seen := map[[2]string]bool{} // a policy changed n times in a batch: its selector once
	for _, s := range sels {
		sel := labels.SelectorFromSet(s.sel)
		if k := [2]string{s.ns, sel.String()}; !seen[k] {
			seen[k] = true
			byNS[s.ns] = append(byNS[s.ns], sel)
		}
	}
	match := func(pod *corev1.Pod, sels []labels.Selector) {
		set := labels.Set(pod.Labels)
		for _, sel := range sels {
			if sel.Matches(set) {
				pods[pod.Namespace+"/"+pod.Name] = true
				return
			}
		}
	}
	if all := byNS[""]; len(all) > 0 { // the root namespace's policies select in every namespace
		for _, pod := range m.c.allPods() {
			match(pod, all)
		}
	}
	for ns, sels := range byNS {
		if ns == "" {
			continue
		}
		for _, k := range m.c.podKeysIn(ns) {
			if pod := m.c.pod(k); pod != nil {
				match(pod, sels)
			}
		}
	}
}

// apply applies st's delta to m.snap and returns the new snapshot (m.snap
// itself when nothing applied), the items rejected and the changes that
// redo them.
//
// Apply checks each item against the state it lands in, in its order, so
// an item may be rejected only because another item of the same delta
// comes after it: a policy leaving WorkloadSelector scope once no workload
// lists it, a workload taking an address another one gives up. The
// rejected items are applied again, round after round, while a round
// applies some. Workloads still rejected may be a cycle (two pods that
// swap addresses, as StatefulSet pods recreated in one batch can): they are
// removed and added again in two Applies, and any of them still rejected
// then gets its previous version back.
func (m *model) apply(st *step) (*config.Snapshot, []config.Rejection, *changes) {
	d := st.delta
	if d.Len() == 0 {
		return m.snap, nil, nil
	}
	next, rejected := m.snap.Apply(d)
	for len(rejected) > 0 {
		n, r := next.Apply(pick(&d, rejected))
		if len(r) == len(rejected) {
			break // no progress
		}
		next, rejected = n, r
	}
	if stuck := pick(&d, rejected).Workloads; len(stuck) > 0 {
		gone := make([]string, len(stuck))
		for i, w := range stuck {
			gone[i] = w.UID
		}
		n, _ := next.Apply(config.Delta{RemovedWorkloads: gone})
		n, r := n.Apply(config.Delta{Workloads: stuck})
		var restore []*config.Workload
		for _, rj := range r {
			if old, ok := m.snap.WorkloadByUID(rj.Key); ok {
				restore = append(restore, old)
			}
		}
		if len(restore) > 0 {
			n, _ = n.Apply(config.Delta{Workloads: restore})
		}
		rejected = slices.DeleteFunc(rejected, func(rj config.Rejection) bool { return rj.Kind == "workload" })
		next, rejected = n, append(rejected, r...)
	}
	if len(rejected) == 0 {
		return next, nil, nil
	}
	redo := &changes{}
	for _, r := range rejected {
		if f := st.keys[[2]string{r.Kind, r.Key}]; f != nil {
			f(redo)
		}
	}
	if len(rejected) == d.Len() {
		next = m.snap
	}
	return next, rejected, redo
}

// pick returns the items of d that were rejected.
func pick(d *config.Delta, rejected []config.Rejection) config.Delta {
	is := map[[2]string]bool{}
	for _, r := range rejected {
		is[[2]string{r.Kind, r.Key}] = true
	}
	var out config.Delta
	for _, w := range d.Workloads {
		if is[[2]string{"workload", w.UID}] {
			out.Workloads = append(out.Workloads, w)
		}
	}
	for _, s := range d.Services {
		if is[[2]string{"service", s.Key().String()}] {
			out.Services = append(out.Services, s)
		}
	}
	for _, k := range d.RemovedServices {
		if is[[2]string{"service", k.String()}] {
			out.RemovedServices = append(out.RemovedServices, k)
		}
	}
	for _, p := range d.Policies {
		if is[[2]string{"policy", p.Key()}] {
			out.Policies = append(out.Policies, p)
		}
	}
	for _, k := range d.RemovedPolicies {
		if is[[2]string{"policy", k}] {
			out.RemovedPolicies = append(out.RemovedPolicies, k)
		}
	}
	if d.SetPeerAuthentications && is[[2]string{"peerAuthentications", "*"}] {
		out.PeerAuthentications, out.SetPeerAuthentications = d.PeerAuthentications, true
	}
	return out
}

// skippedList returns the reasons of the objects left out, sorted.
func (m *model) skippedList() []string {
	out := make([]string, 0, len(m.skipped))
	for _, why := range m.skipped {
		out = append(out, why)
	}
	sort.Strings(out)
	return out
}

// invalidList returns "namespace/name: why" of each policy rule that fails
// closed, sorted.
func (m *model) invalidList() []string {
	var out []string
	for key, whys := range m.invalid {
		for _, why := range whys {
			out = append(out, key+": "+why)
		}
	}
	sort.Strings(out)
	return out
}

// joinRejections makes one error of Apply's rejections.
func joinRejections(rs []config.Rejection) error {
	errs := make([]error, len(rs))
	for i, r := range rs {
		errs[i] = r
	}
	return errors.Join(errs...)
}

// localUID returns the pod UID of a rejected local workload's pod, "" if
// the workload is not one of local's.
func localUID(uid, clusterID string, local []*corev1.Pod) string {
	key := strings.TrimPrefix(uid, clusterID+"//Pod/")
	for _, pod := range local {
		if pod.Namespace+"/"+pod.Name == key {
			return string(pod.UID)
		}
	}
	return ""
}
