package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/warren-mesh/warren/internal/cgroup2"
	"github.com/warren-mesh/warren/pkg/config/kube"
	"github.com/warren-mesh/warren/pkg/config/kube/kubetest"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

// TestKubernetesMode runs the agents in Kubernetes mode against a real API
// server: the lab's pods are registered as Pods (status patched with their
// IPs, since there is no kubelet), each pod gets a "pause" process in a
// cgroup named after its Pod UID as the kubelet would make it, the agents find
// the pods' network namespaces from /proc, enroll the labelled namespace,
// tunnel its traffic, and stop capturing when the label is removed.
func TestKubernetesMode(t *testing.T) {
	c := newCluster(t)
	env := kubetest.StartWith(t, kubetest.Config{ServiceCIDR: "198.18.200.0/24"})
	ctx := t.Context()
	k := env.Kube

	// The Pods, as the scheduler and kubelet would have them.
	sa := map[string]string{"client1": "client", "client2": "client", "server1": "server", "server2": "server", "outside": "default"}
	uids := map[string]types.UID{}
	for _, name := range slices.Sorted(maps.Keys(sa)) {
		labels := map[string]string{"app": sa[name]}
		if name == "outside" {
			labels[kube.DefaultEnrollLabel] = kube.OptOutValue
		}
		uids[name] = registerPod(t, env, c.pod(name), sa[name], labels)
		startPause(t, c.pod(name), uids[name])
	}
	// The echo service on both servers, port 80 → named port "sink" (9000).
	if _, err := k.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{ClusterIP: mesh.EchoVIP.String(),
			Ports: []corev1.ServicePort{{Name: "tcp", Port: 80, TargetPort: intstr.FromString("sink")}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	name, port := "tcp", int32(9000)
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "echo-1", Labels: map[string]string{discoveryv1.LabelServiceName: "echo"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port}},
	}
	for _, s := range []string{"server1", "server2"} {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{c.pod(s).IPv4().String()},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "default", Name: s}})
	}
	if _, err := k.DiscoveryV1().EndpointSlices("default").Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	setNamespaceLabel(t, env, kube.DefaultEnrollValue)

	// Agents in Kubernetes mode, reaching the API server through a loopback
	// forwarder inside each node's network namespace.
	dir := t.TempDir()
	kubeconfig := env.Kubeconfig(t, dir, "warren-nodeagent", nil)
	host, err := url.Parse(env.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	m := &mesh.Mesh{Cluster: c.c, AgentPath: agentPath, Dir: dir, CfgPath: filepath.Join(dir, "unused.yaml"), Agents: map[string]*lab.Process{}}
	writeCA(t, filepath.Join(dir, "ca"))
	t.Cleanup(func() {
		if t.Failed() {
			for name, p := range m.Agents {
				t.Logf("agent on %s:\n%s", name, p.Output())
			}
		}
		m.Stop()
	})
	for _, n := range c.lab.Nodes() {
		forwardLoopback(t, n, host.Host)
		if _, err := m.StartAgent(n, []string{"--provider", "kubernetes", "--kubeconfig", kubeconfig,
			"--netns-dirs", "/run/netns", "--log-level", "debug"}); err != nil {
			t.Fatal(err)
		}
	}

	for _, s := range []string{"server1", "server2"} {
		c.serve(t, c.pod(s), "sink", "-l", ":9000")
	}
	client := c.pod("client1")
	srcP := "spiffe://cluster.local/ns/default/sa/client"
	dstP := "spiffe://cluster.local/ns/default/sa/server"
	tunneled := map[string]string{"reporter": "source", "source_principal": srcP, "destination_principal": dstP, "connection_security_policy": "mutual_tls"}
	captured := map[string]string{"event": "captured"}
	metric := func(node, name string, want map[string]string) float64 {
		t.Helper()
		v, err := m.Metric(node, name, want)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	source := func(dst netip.AddrPort) {
		t.Helper()
		if _, err := c.c.Source(client, dst, 1<<20); err != nil {
			t.Fatalf("1 MiB from client1 to %s: %v", dst, err)
		}
	}
	server2 := netip.AddrPortFrom(c.pod("server2").IPv4(), 9000)
	vip := netip.AddrPortFrom(mesh.EchoVIP, 80)

	t.Run("enrolled", func(t *testing.T) {
		for _, n := range []string{"node1", "node2"} {
			want := map[string][]string{"node1": {"client1", "server1"}, "node2": {"client2", "server2"}}[n]
			waitServing(t, m, c.lab.Node(n), want)
		}
		// The namespace was found from /proc and mapped to the lab's bind mount.
		body, err := m.Admin(c.lab.Node("node1"), "/workloads")
		if err != nil {
			t.Fatal(err)
		}
		var ws []struct{ Name, Netns string }
		if err := json.Unmarshal(body, &ws); err != nil {
			t.Fatal(err)
		}
		for _, w := range ws {
			if w.Netns != c.pod(w.Name).NetNSPath() {
				t.Errorf("%s: agent uses netns %s, want %s", w.Name, w.Netns, c.pod(w.Name).NetNSPath())
			}
		}
		for name, want := range map[string]string{"client1": kube.RedirectionEnabled, "server2": kube.RedirectionEnabled, "outside": ""} {
			waitAnnotation(t, env, name, want)
		}
		source(server2)
		source(vip)
		if got := metric("node1", "istio_tcp_connections_opened_total", tunneled); got != 2 {
			t.Errorf("node1 tunneled connections = %v, want 2 (pod and service VIP)", got)
		}
		for name, proc := range m.Agents {
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", proc.PID())); err == nil {
				for _, l := range strings.Split(string(b), "\n") {
					if strings.HasPrefix(l, "VmRSS:") || strings.HasPrefix(l, "VmHWM:") {
						t.Logf("agent on %s (Kubernetes mode, 2 pods): %s", name, strings.Join(strings.Fields(l), " "))
					}
				}
			}
		}
		dst := map[string]string{"reporter": "destination", "source_principal": srcP, "destination_workload": "server2"}
		if got := metric("node2", "istio_tcp_connections_opened_total", dst); got < 1 {
			t.Errorf("node2 destination-reported connections from client1 = %v, want >= 1", got)
		}
	})

	t.Run("label removed stops capture", func(t *testing.T) {
		opened := metric("node1", "istio_tcp_connections_opened_total", tunneled)
		capturedBefore := metric("node1", "warren_bpf_events_total", captured)
		setNamespaceLabel(t, env, "")
		for _, n := range []string{"node1", "node2"} {
			waitServing(t, m, c.lab.Node(n), nil)
		}
		waitAnnotation(t, env, "client1", "")
		source(server2) // plain TCP now, straight to the pod
		if got := metric("node1", "istio_tcp_connections_opened_total", tunneled); got != opened {
			t.Errorf("tunneled connections went from %v to %v after the namespace left the mesh", opened, got)
		}
		if got := metric("node1", "warren_bpf_events_total", captured); got != capturedBefore {
			t.Errorf("captured connects went from %v to %v after the namespace left the mesh", capturedBefore, got)
		}
	})

	t.Run("label back", func(t *testing.T) {
		opened := metric("node1", "istio_tcp_connections_opened_total", tunneled)
		setNamespaceLabel(t, env, kube.DefaultEnrollValue)
		waitServing(t, m, c.lab.Node("node1"), []string{"client1", "server1"})
		waitServing(t, m, c.lab.Node("node2"), []string{"client2", "server2"})
		source(server2)
		if got := metric("node1", "istio_tcp_connections_opened_total", tunneled); got != opened+1 {
			t.Errorf("tunneled connections = %v, want %v", got, opened+1)
		}
	})

	// An ALLOW whose only rule holds a value warren cannot parse must not
	// open the workload to everyone: each such policy denies client1, which
	// a rule silently stripped of its condition would have let in.
	t.Run("unparseable policy values fail closed", func(t *testing.T) {
		c.serve(t, c.pod("server2"), "echo", "-l", ":7100")
		echo := netip.AddrPortFrom(c.pod("server2").IPv4(), 7100)
		if r := c.probe(t, client, echo, "before"); r.Reply != "before" {
			t.Fatalf("control without policy: reply %q", r.Reply)
		}
		policies := k8sPolicies(env)
		for name, src := range map[string]*securityapi.Rule{
			"bad-ipblock": {From: []*securityapi.Rule_From{{Source: &securityapi.Source{IpBlocks: []string{"10.0.0.0/33"}}}}},
			"bad-port":    {To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{Ports: []string{"http"}}}}},
			"bad-sa":      {From: []*securityapi.Rule_From{{Source: &securityapi.Source{ServiceAccounts: []string{"no-slash"}}}}},
		} {
			t.Run(name, func(t *testing.T) {
				ap := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
					Spec: securityapi.AuthorizationPolicy{Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "server"}},
						Action: securityapi.AuthorizationPolicy_ALLOW, Rules: []*securityapi.Rule{src}}}
				if _, err := policies.Create(ctx, ap, metav1.CreateOptions{}); err != nil {
					t.Fatalf("the API server refused the policy (it should store it, as without Istio's webhook): %v", err)
				}
				applied := time.Now()
				waitInvalidRule(t, m, c.lab.Node("node2"), "default/"+name)
				t.Logf("%s applied by node2's agent %v after creation", name, time.Since(applied).Round(time.Millisecond))
				if got := metric("node2", "warren_config_invalid_rules", map[string]string{"policy": "default/" + name, "action": "ALLOW"}); got != 1 {
					t.Errorf("warren_config_invalid_rules = %v, want 1", got)
				}
				r, err := c.c.Probe(client, echo, "denied?")
				if err == nil && r.Reply != "" {
					t.Errorf("client1 reached server2 through an ALLOW with an unparseable value: %+v", r)
				}
				if err := policies.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
					t.Fatal(err)
				}
				// Control: without the policy client1 gets through again.
				deadline := time.Now().Add(10 * time.Second)
				for {
					r, err := c.c.Probe(client, echo, "after")
					if err == nil && r.Reply == "after" {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("client1 still refused 10 s after the policy was deleted: %+v %v", r, err)
					}
					time.Sleep(100 * time.Millisecond)
				}
			})
		}
	})

	// The race: a pod whose processes the agent has not found yet is not
	// captured, so its connections leave in plaintext; under STRICT the
	// destination's agent refuses them. Once found, the pod is enrolled.
	t.Run("pod before enrollment never reaches STRICT in plaintext", func(t *testing.T) {
		if err := c.c.AddPod(c.lab.Node("node1"), "late"); err != nil {
			t.Fatal(err)
		}
		late := c.pod("late")
		uid := registerPod(t, env, late, "client", map[string]string{"app": "client"})
		c.serve(t, c.pod("server2"), "echo", "-l", ":7000")
		echo := netip.AddrPortFrom(c.pod("server2").IPv4(), 7000)
		// The agent has seen the Pod and waits for its netns, not findable yet.
		waitWaiting(t, m, c.lab.Node("node1"), "default/late")
		// Control: under PERMISSIVE the uncaptured plaintext is accepted.
		if r := c.probe(t, late, echo, "plaintext"); r.Reply != "plaintext" {
			t.Fatalf("PERMISSIVE plaintext: reply %q", r.Reply)
		}
		if _, err := k.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: kube.DefaultRootNamespace}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		strict := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: kube.DefaultRootNamespace},
			Spec: securityapi.PeerAuthentication{Mtls: &securityapi.PeerAuthentication_MutualTLS{Mode: securityapi.PeerAuthentication_MutualTLS_STRICT}}}
		if _, err := env.Istio.SecurityV1().PeerAuthentications(kube.DefaultRootNamespace).Create(ctx, strict, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitStrict(t, m, c.lab.Node("node2"))
		r, err := c.c.Probe(late, echo, "plaintext")
		if err == nil && r.Reply != "" {
			t.Fatalf("an unenrolled pod reached a STRICT destination in plaintext: %+v", r)
		}
		t.Logf("STRICT refused the unenrolled pod: reply %q, err %v", r.Reply, err)

		startPause(t, late, uid) // its sandbox appears in /proc
		waitServing(t, m, c.lab.Node("node1"), []string{"client1", "late", "server1"})
		if r := c.probe(t, late, echo, "tunneled"); r.Reply != "tunneled" {
			t.Fatalf("enrolled pod: reply %q", r.Reply)
		}
		lateTunneled := map[string]string{"reporter": "source", "source_workload": "late", "connection_security_policy": "mutual_tls"}
		if got := metric("node1", "istio_tcp_connections_opened_total", lateTunneled); got != 1 {
			t.Errorf("tunneled connections from the late pod = %v, want 1", got)
		}
	})
}

func k8sPolicies(env *kubetest.Env) interface {
	Create(context.Context, *securityv1.AuthorizationPolicy, metav1.CreateOptions) (*securityv1.AuthorizationPolicy, error)
	Delete(context.Context, string, metav1.DeleteOptions) error
} {
	return env.Istio.SecurityV1().AuthorizationPolicies("default")
}

// waitConfigDump polls n's agent's /config_dump, decoded into a T, until ok
// accepts it (within 10 s), and fails the test with what otherwise.
func waitConfigDump[T any](t *testing.T, m *mesh.Mesh, n *lab.Node, what string, ok func(*T) bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		body, err := m.Admin(n, "/config_dump")
		if err != nil {
			continue
		}
		var dump T
		if json.Unmarshal(body, &dump) == nil && ok(&dump) {
			return
		}
	}
	t.Fatalf("agent on %s: %s", n.Name(), what)
}

// waitInvalidRule waits until n's agent holds policy key with a rule
// marked invalid (fail closed).
func waitInvalidRule(t *testing.T, m *mesh.Mesh, n *lab.Node, key string) {
	t.Helper()
	type dump struct {
		Policies []struct {
			Name, Namespace string
			Invalid         []string
		}
	}
	waitConfigDump(t, m, n, "did not apply "+key+" with an invalid rule", func(d *dump) bool {
		for _, p := range d.Policies {
			if p.Namespace+"/"+p.Name == key && len(p.Invalid) > 0 {
				t.Logf("%s: %v", key, p.Invalid)
				return true
			}
		}
		return false
	})
}

// waitWaiting waits until n's agent lists pod ("namespace/name") as waiting
// for its network namespace.
func waitWaiting(t *testing.T, m *mesh.Mesh, n *lab.Node, pod string) {
	t.Helper()
	type dump struct{ Provider struct{ Waiting []string } }
	waitConfigDump(t, m, n, "does not list "+pod+" as waiting for its network namespace", func(d *dump) bool {
		return slices.Contains(d.Provider.Waiting, pod)
	})
}

// waitStrict waits until n's agent has the mesh-wide STRICT mode.
func waitStrict(t *testing.T, m *mesh.Mesh, n *lab.Node) {
	t.Helper()
	type dump struct{ PeerAuthentications []struct{ Mode string } }
	waitConfigDump(t, m, n, "did not apply the STRICT PeerAuthentication", func(d *dump) bool {
		return len(d.PeerAuthentications) == 1 && d.PeerAuthentications[0].Mode == "STRICT"
	})
}

// registerPod creates the Pod of a lab pod, with the status a kubelet would report.
func registerPod(t *testing.T, env *kubetest.Env, lp *lab.Pod, sa string, labels map[string]string) types.UID {
	t.Helper()
	ctx := t.Context()
	pod, err := env.Kube.CoreV1().Pods("default").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: lp.Name(), Labels: labels},
		Spec: corev1.PodSpec{NodeName: lp.Node().Name(), ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "labapp"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: lp.IPv4().String(),
		PodIPs:     []corev1.PodIP{{IP: lp.IPv4().String()}, {IP: lp.IPv6().String()}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
	if _, err := env.Kube.CoreV1().Pods("default").UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return pod.UID
}

// startPause runs a long-lived process in the lab pod, in a child cgroup
// named as the kubelet's cgroupfs driver names a pod's (pod<uid>): the agent
// finds the pod's network namespace through it.
func startPause(t *testing.T, p *lab.Pod, uid types.UID) {
	t.Helper()
	dir := filepath.Join(p.CgroupPath(), "pod"+string(uid))
	if err := cgroup2.Create(dir); err != nil {
		t.Fatal(err)
	}
	proc, err := p.Start("sleep", "3600")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		proc.Stop()
		if err := cgroup2.Remove(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	if err := cgroup2.AddProc(dir, proc.PID()); err != nil {
		t.Fatal(err)
	}
}

func setNamespaceLabel(t *testing.T, env *kubetest.Env, value string) {
	t.Helper()
	v := "null"
	if value != "" {
		v = fmt.Sprintf("%q", value)
	}
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, kube.DefaultEnrollLabel, v)
	if _, err := env.Kube.CoreV1().Namespaces().Patch(t.Context(), "default", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// waitServing waits until n's agent serves exactly the named local pods
// (others may be listed, not served).
func waitServing(t *testing.T, m *mesh.Mesh, n *lab.Node, want []string) {
	t.Helper()
	var got []string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		body, err := m.Admin(n, "/workloads")
		if err != nil {
			continue
		}
		var ws []struct {
			Name    string
			Serving bool
		}
		if err := json.Unmarshal(body, &ws); err != nil {
			t.Fatal(err)
		}
		got = got[:0]
		for _, w := range ws {
			if w.Serving {
				got = append(got, w.Name)
			}
		}
		slices.Sort(got)
		if slices.Equal(got, want) {
			return
		}
	}
	dump, _ := m.Admin(n, "/config_dump")
	t.Fatalf("agent on %s serves %v, want %v\n%s", n.Name(), got, want, dump)
}

func waitAnnotation(t *testing.T, env *kubetest.Env, pod, want string) {
	t.Helper()
	var got string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		p, err := env.Kube.CoreV1().Pods("default").Get(t.Context(), pod, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got = p.Annotations[kube.RedirectionAnnotation]; got == want {
			return
		}
	}
	t.Fatalf("pod %s annotation %s=%q, want %q", pod, kube.RedirectionAnnotation, got, want)
}

// forwardLoopback listens on addr (the API server's 127.0.0.1:port) inside
// n's network namespace and forwards each connection to the same address in
// the test's namespace, so agents on lab nodes reach the API server with an
// unchanged kubeconfig.
func forwardLoopback(t *testing.T, n *lab.Node, addr string) {
	t.Helper()
	var ln net.Listener
	if err := n.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, n.Name(), err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", addr)
			if err != nil {
				in.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, in, out)
			mu.Unlock()
			go func() { io.Copy(out, in); out.Close() }()
			go func() { io.Copy(in, out); in.Close() }()
		}
	}()
}

func writeCA(t *testing.T, dir string) {
	t.Helper()
	cert, key, err := builtinca.GenerateRoot(builtinca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, builtinca.CertFile), cert, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, builtinca.KeyFile), key, 0o600); err != nil {
		t.Fatal(err)
	}
}
