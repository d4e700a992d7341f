package kube_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"
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
	"k8s.io/client-go/kubernetes"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/kube"
	"github.com/warren-mesh/warren/pkg/config/kube/kubetest"
	"github.com/warren-mesh/warren/pkg/config/store"
)

// resolver is a Resolver whose answers the test controls (the /proc scan
// has its own test): enrollment needs a network namespace per local pod.
type resolver struct {
	mu    sync.Mutex
	known map[string]bool // pod UID → found
	calls int
}

func (r *resolver) Resolve(uids []string) (map[string]kube.Netns, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	out := map[string]kube.Netns{}
	for _, u := range uids {
		if r.known[u] {
			out[u] = kube.Netns{Path: "/run/netns/test-" + u}
		}
	}
	return out, nil
}

func (r *resolver) set(uid types.UID) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.known[string(uid)] = true
}

type fixture struct {
	t    *testing.T
	kube kubernetes.Interface
	env  *kubetest.Env
	st   *store.Store
	prov *kube.Provider
	res  *resolver
}

const node = "node-a"

func start(t *testing.T) *fixture {
	env := kubetest.Start(t)
	f := &fixture{t: t, kube: env.Kube, env: env, st: store.New(node), res: &resolver{known: map[string]bool{}}}
	var err error
	f.prov, err = kube.New(env.Kube, env.Istio, f.st, kube.Options{
		Node:          node,
		Resolver:      f.res,
		Config:        config.Options{CheckNetns: func(string) error { return nil }},
		Debounce:      20 * time.Millisecond,
		RetryInterval: 100 * time.Millisecond,
		Logger:        slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.prov.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != context.Canceled {
			t.Errorf("Run returned %v, want context.Canceled", err)
		}
	})
	return f
}

func (f *fixture) namespace(name string, labels map[string]string) {
	f.t.Helper()
	_, err := f.kube.CoreV1().Namespaces().Create(f.t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	if err != nil {
		f.t.Fatal(err)
	}
}

func (f *fixture) labelNamespace(name, value string) {
	f.t.Helper()
	v := "null"
	if value != "" {
		v = fmt.Sprintf("%q", value)
	}
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, kube.DefaultEnrollLabel, v)
	if _, err := f.kube.CoreV1().Namespaces().Patch(f.t.Context(), name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fixture) labelPod(ns, name, value string) {
	f.t.Helper()
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, kube.DefaultEnrollLabel, value)
	if _, err := f.kube.CoreV1().Pods(ns).Patch(f.t.Context(), name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		f.t.Fatal(err)
	}
}

// pod creates a running pod with IPs (there is no kubelet: the test sets the status).
func (f *fixture) pod(ns, name, nodeName, sa string, labels map[string]string, hostNetwork bool, ips ...string) *corev1.Pod {
	f.t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{NodeName: nodeName, ServiceAccountName: sa, HostNetwork: hostNetwork,
			Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}
	p, err := f.kube.CoreV1().Pods(ns).Create(f.t.Context(), p, metav1.CreateOptions{})
	if err != nil {
		f.t.Fatal(err)
	}
	p.Status.Phase = corev1.PodRunning
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	p.Status.PodIP = ips[0]
	p, err = f.kube.CoreV1().Pods(ns).UpdateStatus(f.t.Context(), p, metav1.UpdateOptions{})
	if err != nil {
		f.t.Fatal(err)
	}
	return p
}

// eventually waits until check passes on the current snapshot.
func (f *fixture) eventually(what string, check func(s *config.Snapshot) error) {
	f.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = check(f.st.Current()); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	f.t.Fatalf("%s: %v\nprovider status: %+v", what, err, f.prov.Status())
}

func (f *fixture) annotation(ns, name string) string {
	p, err := f.kube.CoreV1().Pods(ns).Get(f.t.Context(), name, metav1.GetOptions{})
	if err != nil {
		f.t.Fatal(err)
	}
	return p.Annotations[kube.RedirectionAnnotation]
}

func uid(ns, name string) string { return kube.DefaultClusterID + "//Pod/" + ns + "/" + name }

func enrolled(s *config.Snapshot) []string {
	var out []string
	for _, w := range s.EnrolledWorkloads() {
		out = append(out, w.Namespace+"/"+w.Name)
	}
	slices.Sort(out)
	return out
}

// wantEnrolled checks the enrolled pods and their annotations.
func (f *fixture) wantEnrolled(what string, want ...string) {
	f.t.Helper()
	f.eventually(what, func(s *config.Snapshot) error {
		if got := enrolled(s); !slices.Equal(got, want) {
			return fmt.Errorf("enrolled %v, want %v", got, want)
		}
		return nil
	})
	f.eventually(what+" (annotations)", func(*config.Snapshot) error {
		for _, pn := range [][2]string{{"mesh", "a1"}, {"mesh", "a2"}, {"mesh", "a3"}, {"plain", "p1"}} {
			key := pn[0] + "/" + pn[1]
			wantAnn := ""
			if slices.Contains(want, key) {
				wantAnn = kube.RedirectionEnabled
			}
			if got := f.annotation(pn[0], pn[1]); got != wantAnn {
				return fmt.Errorf("%s annotation %s=%q, want %q", key, kube.RedirectionAnnotation, got, wantAnn)
			}
		}
		return nil
	})
}

func TestProvider(t *testing.T) {
	f := start(t)
	ctx := t.Context()
	f.namespace("istio-system", nil)
	f.namespace("mesh", map[string]string{kube.DefaultEnrollLabel: kube.DefaultEnrollValue})
	f.namespace("plain", nil)

	a1 := f.pod("mesh", "a1", node, "client", map[string]string{"app": "client"}, false, "198.19.1.11", "2001:2:0:101::11")
	a2 := f.pod("mesh", "a2", node, "client", map[string]string{kube.DefaultEnrollLabel: kube.OptOutValue}, false, "198.19.1.12")
	a3 := f.pod("mesh", "a3", node, "server", map[string]string{"app": "server"}, false, "198.19.1.13")
	f.pod("mesh", "hostnet", node, "", nil, true, "198.18.0.11")
	p1 := f.pod("plain", "p1", node, "", nil, false, "198.19.1.14")
	f.pod("mesh", "b1", "node-b", "server", map[string]string{"app": "server"}, false, "198.19.2.11")
	for _, p := range []*corev1.Pod{a1, a2, p1} {
		f.res.set(p.UID)
	}
	// a3's network namespace is not found yet: it waits outside the mesh.

	// A service with a named target port, resolved from its EndpointSlice.
	svc, err := f.kube.CoreV1().Services("mesh").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "mesh"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("web")},
			{Name: "raw", Port: 7000, TargetPort: intstr.FromInt32(7001)},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.MustParseAddr(svc.Spec.ClusterIP)
	tcp := corev1.ProtocolTCP
	_, err = f.kube.DiscoveryV1().EndpointSlices("mesh").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "echo-1", Namespace: "mesh", Labels: map[string]string{discoveryv1.LabelServiceName: "echo"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(9000)), Protocol: &tcp}, {Name: ptr("raw"), Port: ptr(int32(7001)), Protocol: &tcp}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"198.19.1.13"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "mesh", Name: "a3"}},
			{Addresses: []string{"198.19.2.11"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "mesh", Name: "b1"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// Policies: a DENY by principal for the namespace, an ALLOW on port 9000
	// for app=server, an L7-only ALLOW (never matches at L4), a mesh-wide
	// STRICT and a PERMISSIVE for app=client.
	policies := []*securityv1.AuthorizationPolicy{
		{ObjectMeta: metav1.ObjectMeta{Name: "deny-evil", Namespace: "mesh"}, Spec: securityapi.AuthorizationPolicy{
			Action: securityapi.AuthorizationPolicy_DENY,
			Rules: []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{
				Principals: []string{"cluster.local/ns/evil/sa/*"}, Namespaces: []string{"evil"}}}}}},
		}},
		{ObjectMeta: metav1.ObjectMeta{Name: "allow-server", Namespace: "mesh"}, Spec: securityapi.AuthorizationPolicy{
			Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "server"}},
			Rules: []*securityapi.Rule{{
				From: []*securityapi.Rule_From{{Source: &securityapi.Source{ServiceAccounts: []string{"mesh/client"}}}},
				To:   []*securityapi.Rule_To{{Operation: &securityapi.Operation{Ports: []string{"9000"}}}},
				When: []*securityapi.Condition{{Key: "source.ip", Values: []string{"198.19.0.0/16"}}},
			}},
		}},
		{ObjectMeta: metav1.ObjectMeta{Name: "allow-get", Namespace: "mesh"}, Spec: securityapi.AuthorizationPolicy{
			Rules: []*securityapi.Rule{{To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{Methods: []string{"GET"}}}}}},
		}},
	}
	for _, p := range policies {
		if _, err := f.env.Istio.SecurityV1().AuthorizationPolicies(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	pas := []*securityv1.PeerAuthentication{
		{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: "istio-system"}, Spec: securityapi.PeerAuthentication{
			Mtls: &securityapi.PeerAuthentication_MutualTLS{Mode: securityapi.PeerAuthentication_MutualTLS_STRICT}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "clients", Namespace: "mesh"}, Spec: securityapi.PeerAuthentication{
			Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "client"}},
			Mtls:     &securityapi.PeerAuthentication_MutualTLS{Mode: securityapi.PeerAuthentication_MutualTLS_PERMISSIVE}}},
	}
	for _, p := range pas {
		if _, err := f.env.Istio.SecurityV1().PeerAuthentications(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("model", func(t *testing.T) {
		f.wantEnrolled("initial", "mesh/a1")
		f.eventually("model", func(s *config.Snapshot) error {
			checks := []struct {
				uid      string
				present  bool
				protocol config.Protocol
				node     string
			}{
				{uid("mesh", "a1"), true, config.ProtocolHBONE, node},
				{uid("mesh", "a2"), true, config.ProtocolTCP, node},  // opted out
				{uid("mesh", "a3"), true, config.ProtocolTCP, node},  // waits for its netns
				{uid("mesh", "hostnet"), false, "", ""},              // hostNetwork: never
				{uid("plain", "p1"), true, config.ProtocolTCP, node}, // namespace not enrolled
				{uid("mesh", "b1"), true, config.ProtocolHBONE, "node-b"},
			}
			for _, c := range checks {
				w, ok := s.WorkloadByUID(c.uid)
				if ok != c.present {
					return fmt.Errorf("workload %s present=%v, want %v", c.uid, ok, c.present)
				}
				if ok && (w.Protocol != c.protocol || w.Node != c.node) {
					return fmt.Errorf("workload %s protocol %s node %s, want %s %s", c.uid, w.Protocol, w.Node, c.protocol, c.node)
				}
			}
			w, _ := s.WorkloadByUID(uid("mesh", "a1"))
			if w.Identity() != "spiffe://cluster.local/ns/mesh/sa/client" || w.NetnsPath() != "/run/netns/test-"+string(a1.UID) ||
				len(w.WorkloadIPs) != 2 || w.Status != config.Healthy || w.CanonicalName() != "client" {
				return fmt.Errorf("a1 = %+v", w)
			}
			if got, ok := s.WorkloadByIP("", netip.MustParseAddr("2001:2:0:101::11")); !ok || got.Name != "a1" {
				return fmt.Errorf("a1 not found by its IPv6 address")
			}
			sv, ok := s.ServiceByVIP("", netip.AddrPortFrom(vip, 80))
			if !ok || sv.Hostname != "echo.mesh.svc.cluster.local" {
				return fmt.Errorf("service by VIP %s: %v %+v", vip, ok, sv)
			}
			if sv.Ports[80] != 0 || sv.Ports[7000] != 7001 {
				return fmt.Errorf("service ports %v, want 80→(named) 7000→7001", sv.Ports)
			}
			eps := s.Endpoints(sv)
			if len(eps) != 2 {
				return fmt.Errorf("%d endpoints, want 2", len(eps))
			}
			for _, ep := range eps {
				if tp, _ := ep.TargetPort(80); tp != 9000 {
					return fmt.Errorf("endpoint %s target port for 80 = %d, want 9000", ep.Workload.Name, tp)
				}
			}
			if n := len(s.Policies()); n != 3 {
				return fmt.Errorf("%d policies, want 3", n)
			}
			return nil
		})
		s := f.st.Current()
		deny, ok := s.Policy("mesh/deny-evil")
		if !ok || deny.Action != config.ActionDeny || deny.Scope != config.ScopeNamespace || len(deny.Rules) != 1 ||
			deny.Rules[0][0][0].Principals[0] != (config.StringMatch{Kind: config.MatchPrefix, Value: "cluster.local/ns/evil/sa/"}) {
			t.Errorf("deny-evil = %+v", deny)
		}
		// An ALLOW whose rules all need L7 attributes can never match at L4:
		// it stays, with no rule, so it denies (as ztunnel does).
		if get, ok := s.Policy("mesh/allow-get"); !ok || get.Action != config.ActionAllow || len(get.Rules) != 0 {
			t.Errorf("allow-get = %+v", get)
		}
		b1, _ := s.WorkloadByUID(uid("mesh", "b1"))
		if !slices.Contains(b1.AuthorizationPolicies, "mesh/allow-server") {
			t.Errorf("b1 policies %v, want mesh/allow-server", b1.AuthorizationPolicies)
		}
		// The peer authentications were created after the policies: they
		// may land in a later batch than the one the checks above saw.
		f.eventually("peer authentications", func(s *config.Snapshot) error {
			a1w, _ := s.WorkloadByUID(uid("mesh", "a1"))
			b1, _ := s.WorkloadByUID(uid("mesh", "b1"))
			if s.MTLSMode(a1w) != config.MTLSPermissive || s.MTLSMode(b1) != config.MTLSStrict {
				return fmt.Errorf("mTLS a1 %s b1 %s, want PERMISSIVE (selector) and STRICT (mesh)", s.MTLSMode(a1w), s.MTLSMode(b1))
			}
			return nil
		})
		st := f.prov.Status()
		if !st.Synced || !st.Loaded || !st.IstioPolicies || !slices.Equal(st.Waiting, []string{"mesh/a3"}) {
			t.Errorf("status %+v", st)
		}
	})

	t.Run("late netns", func(t *testing.T) {
		f.res.set(a3.UID) // the pod's processes appear in /proc
		f.wantEnrolled("a3 found", "mesh/a1", "mesh/a3")
	})

	t.Run("namespace label flips", func(t *testing.T) {
		f.labelNamespace("mesh", "")
		f.wantEnrolled("label removed")
		f.eventually("remote pod leaves the mesh", func(s *config.Snapshot) error {
			if w, _ := s.WorkloadByUID(uid("mesh", "b1")); w.Protocol != config.ProtocolTCP {
				return fmt.Errorf("b1 protocol %s", w.Protocol)
			}
			return nil
		})
		f.labelNamespace("mesh", kube.DefaultEnrollValue)
		f.wantEnrolled("label back", "mesh/a1", "mesh/a3")
		f.labelNamespace("plain", kube.DefaultEnrollValue)
		f.wantEnrolled("second namespace", "mesh/a1", "mesh/a3", "plain/p1")
	})

	t.Run("pod opt-out and back", func(t *testing.T) {
		f.labelPod("mesh", "a1", kube.OptOutValue)
		f.wantEnrolled("a1 opted out", "mesh/a3", "plain/p1")
		f.labelPod("mesh", "a2", "")
		f.wantEnrolled("a2 opted in", "mesh/a2", "mesh/a3", "plain/p1")
	})

	t.Run("pod deleted", func(t *testing.T) {
		if err := f.kube.CoreV1().Pods("mesh").Delete(ctx, "a3", metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(0))}); err != nil {
			t.Fatal(err)
		}
		f.eventually("a3 gone", func(s *config.Snapshot) error {
			if _, ok := s.WorkloadByUID(uid("mesh", "a3")); ok {
				return fmt.Errorf("a3 still in the model")
			}
			if got := enrolled(s); !slices.Equal(got, []string{"mesh/a2", "plain/p1"}) {
				return fmt.Errorf("enrolled %v", got)
			}
			return nil
		})
	})

	t.Run("policy change", func(t *testing.T) {
		if err := f.env.Istio.SecurityV1().AuthorizationPolicies("mesh").Delete(ctx, "deny-evil", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		f.eventually("deny-evil deleted", func(s *config.Snapshot) error {
			if _, ok := s.Policy("mesh/deny-evil"); ok {
				return fmt.Errorf("still there")
			}
			return nil
		})
	})
}

func ptr[T any](v T) *T { return &v }
