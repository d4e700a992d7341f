package kube

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/warren-mesh/warren/pkg/config"
)

// Pure conversion rules; the informer side runs against a real API server
// in provider_test.go.

func testOpts() convertOptions {
	return convertOptions{node: "n1", trustDomain: "cluster.local", clusterID: "c", domain: "cluster.local",
		rootNamespace: "istio-system", label: DefaultEnrollLabel, value: DefaultEnrollValue,
		netns: func(p *corev1.Pod) (Netns, bool) { return Netns{Path: "/run/netns/" + p.Name}, p.Name != "unfound" }}
}

func pod(ns, name, node string, created int, ips ...string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name),
		CreationTimestamp: metav1.NewTime(time.Unix(int64(created), 0))},
		Spec:   corev1.PodSpec{NodeName: node},
		Status: corev1.PodStatus{Phase: corev1.PodRunning}}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	return p
}

func TestConvertWorkloads(t *testing.T) {
	ambient := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "a", Labels: map[string]string{DefaultEnrollLabel: DefaultEnrollValue}}}
	hostNet := pod("a", "hostnet", "n1", 1, "198.18.0.1")
	hostNet.Spec.HostNetwork = true
	optOut := pod("a", "optout", "n1", 1, "198.19.0.2")
	optOut.Labels = map[string]string{DefaultEnrollLabel: OptOutValue}
	done := pod("a", "done", "n1", 1, "198.19.0.3")
	done.Status.Phase = corev1.PodSucceeded
	cases := []struct {
		name     string
		pods     []*corev1.Pod
		protocol map[string]config.Protocol // pod name → protocol; absent: not a workload
		enrolled []string
		waiting  []string
	}{
		{"local in mesh", []*corev1.Pod{pod("a", "web", "n1", 1, "198.19.0.1", "2001:2::1")},
			map[string]config.Protocol{"web": config.ProtocolHBONE}, []string{"web"}, nil},
		{"remote in mesh is HBONE, not enrolled here", []*corev1.Pod{pod("a", "web", "n2", 1, "198.19.1.1")},
			map[string]config.Protocol{"web": config.ProtocolHBONE}, nil, nil},
		{"other namespace stays TCP", []*corev1.Pod{pod("b", "web", "n1", 1, "198.19.0.1")},
			map[string]config.Protocol{"web": config.ProtocolTCP}, nil, nil},
		{"hostNetwork is no workload", []*corev1.Pod{hostNet}, map[string]config.Protocol{}, nil, nil},
		{"opted out", []*corev1.Pod{optOut}, map[string]config.Protocol{"optout": config.ProtocolTCP}, nil, nil},
		{"finished pod is gone", []*corev1.Pod{done}, map[string]config.Protocol{}, nil, nil},
		{"no IP yet", []*corev1.Pod{pod("a", "new", "n1", 1)}, map[string]config.Protocol{}, nil, nil},
		{"netns not found waits as TCP", []*corev1.Pod{pod("a", "unfound", "n1", 1, "198.19.0.9")},
			map[string]config.Protocol{"unfound": config.ProtocolTCP}, nil, []string{"unfound"}},
		{"reused IP goes to the newer pod", []*corev1.Pod{pod("a", "old", "n1", 1, "198.19.0.5"), pod("a", "young", "n1", 2, "198.19.0.5")},
			map[string]config.Protocol{"young": config.ProtocolHBONE}, []string{"young"}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := convert(Inputs{Namespaces: []*corev1.Namespace{ambient}, Pods: c.pods}, testOpts())
			got := map[string]config.Protocol{}
			for _, w := range out.cfg.Workloads {
				got[w.Name] = w.Protocol
			}
			if len(got) != len(c.protocol) {
				t.Errorf("workloads %v, want %v", got, c.protocol)
			}
			for name, p := range c.protocol {
				if got[name] != p {
					t.Errorf("%s protocol %q, want %q", name, got[name], p)
				}
			}
			var enrolled, waiting []string
			for _, p := range out.enrolled {
				enrolled = append(enrolled, p.Name)
			}
			for _, p := range out.waiting {
				waiting = append(waiting, p.Name)
			}
			slices.Sort(enrolled)
			if !slices.Equal(enrolled, c.enrolled) || !slices.Equal(waiting, c.waiting) {
				t.Errorf("enrolled %v waiting %v, want %v %v", enrolled, waiting, c.enrolled, c.waiting)
			}
			if _, err := config.NewSnapshot(out.cfg, config.Options{Node: "n1", CheckNetns: func(string) error { return nil }}); err != nil {
				t.Errorf("snapshot rejected: %v", err)
			}
		})
	}
}

func TestConvertServices(t *testing.T) {
	svc := func(name, clusterIP string, ports ...corev1.ServicePort) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: name},
			Spec: corev1.ServiceSpec{ClusterIP: clusterIP, ClusterIPs: []string{clusterIP}, Ports: ports}}
	}
	cases := []struct {
		name  string
		svc   *corev1.Service
		ports config.PortMap // nil: no service in the model
	}{
		{"numeric target", svc("s", "198.18.200.1", corev1.ServicePort{Port: 80, TargetPort: intstr.FromInt32(8080)}), config.PortMap{80: 8080}},
		{"no target means the port", svc("s", "198.18.200.1", corev1.ServicePort{Port: 80}), config.PortMap{80: 80}},
		{"named target per endpoint", svc("s", "198.18.200.1", corev1.ServicePort{Port: 80, TargetPort: intstr.FromString("http")}), config.PortMap{80: 0}},
		{"UDP ports left out", svc("s", "198.18.200.1", corev1.ServicePort{Port: 53, Protocol: corev1.ProtocolUDP}, corev1.ServicePort{Port: 54}), config.PortMap{54: 54}},
		{"headless has no VIP", svc("s", corev1.ClusterIPNone, corev1.ServicePort{Port: 80}), nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := convert(Inputs{Services: []*corev1.Service{c.svc}}, testOpts())
			if c.ports == nil {
				if len(out.cfg.Services) != 0 {
					t.Fatalf("services %v, want none", out.cfg.Services)
				}
				return
			}
			if len(out.cfg.Services) != 1 {
				t.Fatalf("%d services", len(out.cfg.Services))
			}
			s := out.cfg.Services[0]
			if s.Hostname != "s.a.svc.cluster.local" || s.VIPs[0].Addr != netip.MustParseAddr("198.18.200.1") {
				t.Errorf("service %+v", s)
			}
			if len(s.Ports) != len(c.ports) {
				t.Errorf("ports %v, want %v", s.Ports, c.ports)
			}
			for k, v := range c.ports {
				if p, ok := s.Ports[k]; !ok || p != v {
					t.Errorf("ports %v, want %v", s.Ports, c.ports)
				}
			}
		})
	}
}

func TestConvertPolicies(t *testing.T) {
	l4From := &securityapi.Rule_From{Source: &securityapi.Source{Namespaces: []string{"x"}}}
	get := &securityapi.Rule_To{Operation: &securityapi.Operation{Methods: []string{"GET"}, Ports: []string{"80"}}}
	cases := []struct {
		name   string
		ns     string
		spec   *securityapi.AuthorizationPolicy
		scope  config.Scope
		action config.Action
		rules  int  // converted rules
		absent bool // not in the model
	}{
		{"namespace ALLOW", "a", &securityapi.AuthorizationPolicy{Rules: []*securityapi.Rule{{From: []*securityapi.Rule_From{l4From}}}},
			config.ScopeNamespace, config.ActionAllow, 1, false},
		{"root namespace is global", "istio-system", &securityapi.AuthorizationPolicy{Action: securityapi.AuthorizationPolicy_DENY, Rules: []*securityapi.Rule{{}}},
			config.ScopeGlobal, config.ActionDeny, 1, false},
		{"selector", "a", &securityapi.AuthorizationPolicy{Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "x"}}},
			config.ScopeWorkloadSelector, config.ActionAllow, 0, false},
		{"L7 ALLOW rule can never match", "a", &securityapi.AuthorizationPolicy{Rules: []*securityapi.Rule{{To: []*securityapi.Rule_To{get}}}},
			config.ScopeNamespace, config.ActionAllow, 0, false},
		{"L7 DENY rule keeps its L4 part", "a", &securityapi.AuthorizationPolicy{Action: securityapi.AuthorizationPolicy_DENY,
			Rules: []*securityapi.Rule{{To: []*securityapi.Rule_To{get}}, {When: []*securityapi.Condition{{Key: "request.headers[x]", Values: []string{"y"}}}}}},
			config.ScopeNamespace, config.ActionDeny, 2, false},
		{"AUDIT is left out", "a", &securityapi.AuthorizationPolicy{Action: securityapi.AuthorizationPolicy_AUDIT}, "", "", 0, true},
		{"waypoint policy is left out", "a", &securityapi.AuthorizationPolicy{TargetRefs: []*typeapi.PolicyTargetReference{{Kind: "Service", Name: "s"}}}, "", "", 0, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: c.ns, Name: "p"}}
			p.Spec.Action, p.Spec.Selector, p.Spec.Rules, p.Spec.TargetRefs = c.spec.Action, c.spec.Selector, c.spec.Rules, c.spec.TargetRefs
			out := convert(Inputs{Policies: []*securityv1.AuthorizationPolicy{p}}, testOpts())
			if c.absent {
				if len(out.cfg.Policies) != 0 || len(out.skipped) != 1 {
					t.Errorf("policies %v skipped %v, want it skipped", out.cfg.Policies, out.skipped)
				}
				return
			}
			if len(out.cfg.Policies) != 1 {
				t.Fatalf("%d policies", len(out.cfg.Policies))
			}
			ap := out.cfg.Policies[0]
			if ap.Scope != c.scope || ap.Action != c.action || len(ap.Rules) != c.rules {
				t.Errorf("policy %+v, want scope %s action %s with %d rules", ap, c.scope, c.action, c.rules)
			}
		})
	}
	// The DENY's L4 part: port 80 stays, the method is dropped (it denies more).
	p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "p"}}
	p.Spec.Action = securityapi.AuthorizationPolicy_DENY
	p.Spec.Rules = []*securityapi.Rule{{To: []*securityapi.Rule_To{get}}}
	out := convert(Inputs{Policies: []*securityv1.AuthorizationPolicy{p}}, testOpts())
	if r := out.cfg.Policies[0].Rules[0]; len(r) != 1 || !slices.Equal(r[0][0].DestinationPorts, []uint16{80}) {
		t.Errorf("DENY rule %+v, want port 80 only", r)
	}
}

func TestMTLSMode(t *testing.T) {
	for in, want := range map[securityapi.PeerAuthentication_MutualTLS_Mode]config.MTLSMode{
		securityapi.PeerAuthentication_MutualTLS_STRICT:     config.MTLSStrict,
		securityapi.PeerAuthentication_MutualTLS_PERMISSIVE: config.MTLSPermissive,
		securityapi.PeerAuthentication_MutualTLS_DISABLE:    config.MTLSPermissive,
		securityapi.PeerAuthentication_MutualTLS_UNSET:      config.MTLSUnset,
	} {
		if got := mtlsMode(in); got != want {
			t.Errorf("mtlsMode(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestMatchCgroup(t *testing.T) {
	uid := "11111111-2222-3333-4444-555555555555"
	want := map[string]string{"pod" + uid: uid, "pod11111111_2222_3333_4444_555555555555": uid}
	cases := []struct{ name, content, uid, dir string }{
		{"cgroupfs", "0::/kubepods/burstable/pod" + uid + "/abc\n", uid, "/kubepods/burstable/pod" + uid},
		{"systemd", "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod11111111_2222_3333_4444_555555555555.slice/cri-containerd-x.scope\n",
			uid, "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod11111111_2222_3333_4444_555555555555.slice"},
		{"seen from a cgroup namespace", "0::/../../kubepods/pod" + uid + "/abc\n", uid, "/../../kubepods/pod" + uid},
		{"cgroup v1 line", "12:memory:/kubepods/pod" + uid + "/abc\n", uid, ""},
		{"other pod", "0::/kubepods/pod99999999-2222-3333-4444-555555555555/abc\n", "", ""},
		{"prefix is not enough", "0::/kubepods/pod" + uid + "0/abc\n", "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			u, dir := matchCgroup(c.content, want)
			if u != c.uid || dir != c.dir {
				t.Errorf("matchCgroup = %q %q, want %q %q", u, dir, c.uid, c.dir)
			}
		})
	}
}
