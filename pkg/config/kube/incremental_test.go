package kube

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/cache"

	"github.com/warren-mesh/warren/pkg/config"
)

// fakeCaches are informer stores the test writes, with the provider's
// indexes, and the events the writes make.
type fakeCaches struct {
	c      *caches
	events *events
}

func newFakeCaches(opts convertOptions, istio bool) *fakeCaches {
	idx := func(i cache.Indexers) cache.Indexer { return cache.NewIndexer(cache.MetaNamespaceKeyFunc, i) }
	var policies, peerAuths cache.Indexer
	if istio {
		policies, peerAuths = idx(nsIndexers), idx(nsIndexers)
	}
	c := newCaches(opts.node, idx(cache.Indexers{}), idx(nsIndexers), idx(nsIndexers), idx(cache.Indexers{}), idx(cache.Indexers{}),
		policies, peerAuths)
	return &fakeCaches{c: c, events: &events{root: opts.rootNamespace, label: opts.label, value: opts.value}}
}

// put stores obj in store (nil deletes the object of key) and records the
// event, as an informer does.
func (f *fakeCaches) put(store cache.Indexer, key string, obj any) {
	old, had, _ := store.GetByKey(key)
	if !had {
		old = nil
	}
	switch {
	case obj == nil && had:
		if err := store.Delete(old); err != nil {
			panic(err)
		}
		f.c.observe(store, old, nil)
		f.events.add(old, nil)
	case obj != nil:
		if err := store.Update(obj); err != nil {
			panic(err)
		}
		f.c.observe(store, old, obj)
		f.events.add(old, obj)
	}
}

// putPod stores a pod as both pod informers would (the cluster-wide one
// slimmed), or in one of them only (the other lags).
func (f *fakeCaches) putPod(key string, pod *corev1.Pod, which int) {
	var slim any
	var full any
	if pod != nil {
		slim, full = slimPod(pod), pod
		if pod.Spec.NodeName != f.c.node {
			full = nil
		}
	}
	if which != 2 {
		f.put(f.c.pods, key, slim)
	}
	if which != 1 {
		f.put(f.c.localPods, key, full)
	}
}

// gen makes random objects from small pools, so that they collide: pods
// share addresses, selectors match, slices name pods that come and go.
type gen struct {
	r *rand.Rand
}

var (
	genNamespaces = []string{"a", "b", "c", "istio-system"}
	genNodes      = []string{"n1", "n2", "n3", ""}
	genPodIPs     = []string{"198.19.0.1", "198.19.0.2", "198.19.0.3", "198.19.0.4", "2001:2::1", "2001:2::2", "::ffff:198.19.0.1"}
)

func (g *gen) pick(s []string) string { return s[g.r.IntN(len(s))] }

// podKey returns pod i's key: a pod's namespace is fixed by its name (names
// are unique across namespaces: local network namespace paths follow them).
func podKey(i int) string {
	name := fmt.Sprint("p", i)
	if i == 0 {
		name = "unfound" // never gets its network namespace
	}
	return genNamespaces[i%len(genNamespaces)] + "/" + name
}

func (g *gen) pod(key string) *corev1.Pod {
	ns, name := splitKey(key)
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name),
		CreationTimestamp: metav1.NewTime(time.Unix(int64(g.r.IntN(3)), 0)), Labels: map[string]string{}},
		Spec:   corev1.PodSpec{NodeName: g.pick(genNodes), ServiceAccountName: g.pick([]string{"", "sa1", "sa2"})},
		Status: corev1.PodStatus{Phase: corev1.PodRunning}}
	if g.r.IntN(2) == 0 {
		p.Labels["app"] = g.pick([]string{"x", "y"})
	}
	if g.r.IntN(6) == 0 {
		p.Labels[DefaultEnrollLabel] = OptOutValue
	}
	switch g.r.IntN(12) {
	case 0:
		p.Spec.HostNetwork = true
	case 1:
		p.Status.Phase = corev1.PodSucceeded
	case 2:
		p.DeletionTimestamp = &metav1.Time{Time: time.Unix(9, 0)}
	}
	if g.r.IntN(3) == 0 {
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	}
	switch g.r.IntN(8) {
	case 0: // no address yet
	case 1:
		p.Status.PodIP = g.pick(genPodIPs)
	case 2:
		p.Status.PodIPs = []corev1.PodIP{{IP: "not-an-ip"}}
	default:
		ips := []string{g.pick(genPodIPs), g.pick(genPodIPs)}
		if ips[0] == ips[1] || strings.TrimPrefix(ips[0], "::ffff:") == strings.TrimPrefix(ips[1], "::ffff:") || g.r.IntN(2) == 0 {
			ips = ips[:1]
		}
		for _, ip := range ips {
			p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
		}
	}
	return p
}

func (g *gen) namespace(name string) *corev1.Namespace {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"team": g.pick([]string{"1", "2"})}}}
	if g.r.IntN(3) != 0 {
		ns.Labels[DefaultEnrollLabel] = g.pick([]string{DefaultEnrollValue, "other"})
	}
	return ns
}

// service i has its own VIP, when it has one (VIPs never collide).
func (g *gen) service(key string, i int) *corev1.Service {
	ns, name := splitKey(key)
	s := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	switch g.r.IntN(5) {
	case 0:
		s.Spec.ClusterIP = corev1.ClusterIPNone
	case 1:
		s.Spec.Type = corev1.ServiceTypeExternalName
	default:
		s.Spec.ClusterIP = fmt.Sprintf("198.18.100.%d", i+1)
	}
	s.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("web")}}
	if g.r.IntN(2) == 0 {
		s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "raw", Port: int32(7000 + g.r.IntN(2)), TargetPort: intstr.FromInt32(7001)})
	}
	return s
}

func (g *gen) slice(key string, services []string) *discoveryv1.EndpointSlice {
	ns, name := splitKey(key)
	es := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name,
		Labels: map[string]string{discoveryv1.LabelServiceName: g.pick(services)}}}
	tcp := corev1.ProtocolTCP
	for _, pn := range []string{"http", "raw"} {
		if g.r.IntN(3) != 0 {
			pn := pn
			port := int32(9000 + g.r.IntN(3))
			es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: &pn, Port: &port, Protocol: &tcp})
		}
	}
	for range g.r.IntN(4) {
		_, pod := splitKey(podKey(g.r.IntN(16)))
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{"198.19.0.1"},
			TargetRef: &corev1.ObjectReference{Kind: g.pick([]string{"Pod", "Pod", "Node"}), Namespace: ns, Name: pod}})
	}
	return es
}

func (g *gen) selector() *typeapi.WorkloadSelector {
	switch g.r.IntN(3) {
	case 0:
		return nil
	case 1:
		return &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "x"}}
	}
	return &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": g.pick([]string{"x", "y"})}}
}

func (g *gen) policy(key string) *securityv1.AuthorizationPolicy {
	ns, name := splitKey(key)
	p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	p.Spec.Selector = g.selector()
	switch g.r.IntN(8) {
	case 0:
		p.Spec.Action = securityapi.AuthorizationPolicy_AUDIT
	case 1:
		p.Spec.TargetRefs = []*typeapi.PolicyTargetReference{{Kind: "Service", Name: "s"}}
	case 2, 3, 4:
		p.Spec.Action = securityapi.AuthorizationPolicy_DENY
	}
	ports := []string{"80", "8080", "http"} // "http" fails the rule closed
	p.Spec.Rules = []*securityapi.Rule{{To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{Ports: []string{g.pick(ports)}}}}}}
	return p
}

func (g *gen) peerAuth(key string) *securityv1.PeerAuthentication {
	ns, name := splitKey(key)
	p := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	p.Spec.Selector = g.selector()
	if name != "pa0" && p.Spec.Selector == nil {
		// Two namespace-wide modes for one namespace fail the snapshot
		// (config.NewSnapshot and Apply alike): one per namespace here.
		p.Spec.Selector = &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "y"}}
	}
	modes := []securityapi.PeerAuthentication_MutualTLS_Mode{securityapi.PeerAuthentication_MutualTLS_UNSET,
		securityapi.PeerAuthentication_MutualTLS_STRICT, securityapi.PeerAuthentication_MutualTLS_PERMISSIVE}
	if g.r.IntN(4) != 0 {
		p.Spec.Mtls = &securityapi.PeerAuthentication_MutualTLS{Mode: modes[g.r.IntN(len(modes))]}
	}
	return p
}

// mutate makes one random change to the caches.
func (g *gen) mutate(f *fakeCaches) string {
	del := g.r.IntN(5) == 0
	obj := func(o any) any {
		if del {
			return nil
		}
		return o
	}
	switch k := g.r.IntN(10); {
	case k < 4:
		key := podKey(g.r.IntN(16))
		var pod *corev1.Pod
		if !del {
			pod = g.pod(key)
		}
		f.putPod(key, pod, g.r.IntN(4)) // 1 or 2: one informer lags the other
		return "pod " + key
	case k == 4:
		name := g.pick(genNamespaces)
		f.put(f.c.namespaces, name, obj(g.namespace(name)))
		return "namespace " + name
	case k == 5:
		i := g.r.IntN(4)
		key := genNamespaces[i%3] + fmt.Sprint("/s", i)
		f.put(f.c.services, key, obj(g.service(key, i)))
		return "service " + key
	case k == 6:
		i := g.r.IntN(6)
		ns := genNamespaces[i%3]
		key := ns + fmt.Sprint("/es", i)
		f.put(f.c.slices, key, obj(g.slice(key, []string{"s0", "s1", "s2", "s3", "s4"})))
		return "slice " + key
	case k < 9:
		key := g.pick(genNamespaces) + fmt.Sprint("/ap", g.r.IntN(3))
		f.put(f.c.policies, key, obj(g.policy(key)))
		return "policy " + key
	default:
		key := g.pick(genNamespaces) + fmt.Sprint("/pa", g.r.IntN(2))
		f.put(f.c.peerAuths, key, obj(g.peerAuth(key)))
		return "peer authentication " + key
	}
}

// TestIncrementalEqualsRebuild applies random sequences of informer events
// incrementally and checks, after each batch, that the snapshot equals the
// one a full rebuild makes from the same caches.
func TestIncrementalEqualsRebuild(t *testing.T) {
	opts := testOpts()
	// Which local pods' network namespaces are found: the provider's
	// resolve changes it outside the informers, and puts the pods whose
	// entry changed in the batch.
	lost := map[string]bool{"unfound": true}
	opts.netns = func(p *corev1.Pod) (Netns, bool) { return Netns{Path: "/run/netns/" + p.Name}, !lost[p.Name] }
	checkNetns := config.Options{Node: opts.node, CheckNetns: func(string) error { return nil }}
	seeds := 200
	if testing.Short() {
		seeds = 30
	}
	for seed := range seeds {
		clear(lost)
		lost["unfound"] = true
		r := rand.New(rand.NewPCG(uint64(seed), 18))
		g := &gen{r: r}
		f := newFakeCaches(opts, true)
		for range 20 { // an initial cluster
			g.mutate(f)
		}
		f.events.take()
		in := f.c.inputs()
		out := convert(in, opts)
		snap, err := config.NewSnapshot(out.cfg, checkNetns)
		if err != nil {
			t.Fatalf("seed %d: initial snapshot: %v", seed, err)
		}
		m := &model{c: f.c, conv: opts}
		m.reset(&out, snap)
		var history []string
		for batch := range 40 {
			for range 1 + r.IntN(4) {
				history = append(history, g.mutate(f))
			}
			history = append(history, "--")
			ch := f.events.take()
			if r.IntN(3) == 0 {
				i := 1 + r.IntN(15)
				key := podKey(i)
				_, name := splitKey(key)
				lost[name] = !lost[name]
				setAdd(&ch.pods, key)
				history = append(history, "netns "+key)
			}
			st := m.diff(&ch, f.c.local())
			next, rejected, _ := m.apply(st)
			if len(rejected) > 0 {
				t.Fatalf("seed %d batch %d: rejected %v\nevents: %v", seed, batch, rejected, history)
			}
			m.snap = next

			want := convert(f.c.inputs(), opts)
			wantSnap, err := config.NewSnapshot(want.cfg, checkNetns)
			if err != nil {
				t.Fatalf("seed %d batch %d: full rebuild: %v", seed, batch, err)
			}
			if diff := compareSnapshots(next, wantSnap); diff != "" {
				t.Fatalf("seed %d batch %d: incremental differs from a full rebuild: %s\nevents: %v", seed, batch, diff, history)
			}
			if !reflect.DeepEqual(m.skipped, want.skipped) {
				t.Fatalf("seed %d batch %d: skipped %v, want %v\nevents: %v", seed, batch, m.skipped, want.skipped, history)
			}
			if got, want := podNames(st.enrolled), podNames(want.enrolled); !slices.Equal(got, want) {
				t.Fatalf("seed %d batch %d: enrolled %v, want %v", seed, batch, got, want)
			}
			if got, want := podNames(byUID(st.waiting)), podNames(byUID(want.waiting)); !slices.Equal(got, want) {
				t.Fatalf("seed %d batch %d: waiting %v, want %v", seed, batch, got, want)
			}
			wantInvalid := (&model{invalid: map[string][]string{}}).withInvalid(want.cfg.Policies).invalidList()
			if got := m.invalidList(); !slices.Equal(got, wantInvalid) {
				t.Fatalf("seed %d batch %d: invalid rules %v, want %v", seed, batch, got, wantInvalid)
			}
		}
	}
}

func byUID(pods []*corev1.Pod) map[string]*corev1.Pod {
	out := map[string]*corev1.Pod{}
	for _, p := range pods {
		out[string(p.UID)] = p
	}
	return out
}

func (m *model) withInvalid(ps []*config.AuthorizationPolicy) *model {
	for _, p := range ps {
		if len(p.Invalid) > 0 {
			m.invalid[p.Key()] = p.Invalid
		}
	}
	return m
}

// compareSnapshots returns how a differs from b, "" if it does not: the
// workloads, services and their endpoints, the policies (as a set: Apply
// keeps the order they came in, a rebuild sorts them), the peer
// authentications, this node's enrolled workloads, and what each workload
// is subject to (PoliciesFor, MTLSMode).
func compareSnapshots(a, b *config.Snapshot) string {
	aw, bw := a.Workloads(), b.Workloads()
	if len(aw) != len(bw) {
		return fmt.Sprintf("%d workloads, want %d (%v vs %v)", len(aw), len(bw), uids(aw), uids(bw))
	}
	for i := range aw {
		if !reflect.DeepEqual(aw[i], bw[i]) {
			return fmt.Sprintf("workload %s:\n got %+v\nwant %+v", bw[i].UID, aw[i], bw[i])
		}
		if x, y := policyKeys(a.PoliciesFor(aw[i])), policyKeys(b.PoliciesFor(bw[i])); !slices.Equal(x, y) {
			return fmt.Sprintf("workload %s: policies %v, want %v", bw[i].UID, x, y)
		}
		if x, y := a.MTLSMode(aw[i]), b.MTLSMode(bw[i]); x != y {
			return fmt.Sprintf("workload %s: mTLS %s, want %s", bw[i].UID, x, y)
		}
	}
	as, bs := a.Services(), b.Services()
	if !reflect.DeepEqual(as, bs) {
		return fmt.Sprintf("services %+v, want %+v", as, bs)
	}
	for _, s := range bs {
		x, y := a.Endpoints(s), b.Endpoints(s)
		if len(x) != len(y) {
			return fmt.Sprintf("service %s: %d endpoints, want %d", s.Key(), len(x), len(y))
		}
		for i := range x {
			if x[i].Workload.UID != y[i].Workload.UID || !reflect.DeepEqual(x[i].Ports, y[i].Ports) || !reflect.DeepEqual(x[i].Service, y[i].Service) {
				return fmt.Sprintf("service %s: endpoint %d %+v, want %+v", s.Key(), i, x[i], y[i])
			}
		}
	}
	ap, bp := sortedPolicies(a.Policies()), sortedPolicies(b.Policies())
	if !reflect.DeepEqual(ap, bp) {
		return fmt.Sprintf("policies %v, want %v", policyKeys(ap), policyKeys(bp))
	}
	if !reflect.DeepEqual(a.PeerAuthentications(), b.PeerAuthentications()) {
		return fmt.Sprintf("peer authentications %+v, want %+v", a.PeerAuthentications(), b.PeerAuthentications())
	}
	if x, y := uids(a.EnrolledWorkloads()), uids(b.EnrolledWorkloads()); !slices.Equal(x, y) {
		return fmt.Sprintf("enrolled %v, want %v", x, y)
	}
	return ""
}

func uids(ws []*config.Workload) []string {
	var out []string
	for _, w := range ws {
		out = append(out, w.UID)
	}
	return out
}

func policyKeys(ps []*config.AuthorizationPolicy) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Key())
	}
	slices.Sort(out)
	return out
}

func sortedPolicies(ps []*config.AuthorizationPolicy) []*config.AuthorizationPolicy {
	if len(ps) == 0 {
		return nil
	}
	out := slices.Clone(ps)
	slices.SortFunc(out, func(a, b *config.AuthorizationPolicy) int { return strings.Compare(a.Key(), b.Key()) })
	return out
}

// TestIncrementalAddressSwap: two pods recreated under their names with
// each other's address in one batch (a StatefulSet's, say) are a cycle for
// Apply, which checks one item at a time; both are applied.
func TestIncrementalAddressSwap(t *testing.T) {
	opts := testOpts()
	f := newFakeCaches(opts, false)
	mk := func(name, ip string) *corev1.Pod { return pod("a", name, "n2", 1, ip) }
	f.putPod("a/x", mk("x", "198.19.0.1"), 0)
	f.putPod("a/y", mk("y", "198.19.0.2"), 0)
	f.events.take()
	out := convert(f.c.inputs(), opts)
	snap, err := config.NewSnapshot(out.cfg, config.Options{Node: opts.node})
	if err != nil {
		t.Fatal(err)
	}
	m := &model{c: f.c, conv: opts}
	m.reset(&out, snap)

	f.putPod("a/x", mk("x", "198.19.0.2"), 0)
	f.putPod("a/y", mk("y", "198.19.0.1"), 0)
	ch := f.events.take()
	next, rejected, _ := m.apply(m.diff(&ch, f.c.local()))
	if len(rejected) > 0 {
		t.Fatalf("rejected %v", rejected)
	}
	for name, ip := range map[string]string{"x": "198.19.0.2", "y": "198.19.0.1"} {
		w, ok := next.WorkloadByIP("", netip.MustParseAddr(ip))
		if !ok || w.Name != name {
			t.Errorf("%s belongs to %v, want %s", ip, w, name)
		}
	}
}
