package e2e

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/warren-mesh/warren/internal/testenv"
	"github.com/warren-mesh/warren/pkg/config/kube"
	"github.com/warren-mesh/warren/pkg/config/kube/kubetest"
	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

// istiodVersion is the istio.io/istio module version hack/build-istiod.sh builds.
const istiodVersion = "v0.0.0-20260827124520-eed52ebb66ad"

// The agents run as the chart's charts/warren with its istiod values
// renders them (tests/chart TestIstiodValues): ServiceAccount warren in the
// release namespace warren-system, the account the chart README has istiod
// trust in CA_TRUSTED_NODE_ACCOUNTS; --pod-name, --pod-namespace and
// --instance-ips as the downward API fills them (the pod's name and
// namespace, its IP, which is the node's under hostNetwork), --cluster-id
// as the chart's default, one address for xDS and CA.
const (
	istiodAgentNamespace = "warren-system"
	istiodAgentSA        = "warren"
)

// istiodAssets returns the directory with pilot-discovery and Istio's CRDs.
func istiodAssets(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("WARREN_TOOLS_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "warren", "tools")
	}
	dir := filepath.Join(cache, "istiod-"+istiodVersion)
	for _, f := range []string{"pilot-discovery", "crd-all.gen.yaml"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			testenv.SkipOrFail(t, "%s not found in %s: run make tools (hack/build-istiod.sh)", f, dir)
		}
	}
	return dir
}

// istiodCerts is a mesh root (istiod's plug-in CA, so workload
// certificates chain to it) and a serving certificate for 127.0.0.1 signed
// by it: agents verify istiod by IP, so no name has to resolve.
func istiodCerts(t *testing.T, dir string) (caDir, rootFile, certFile, keyFile string) {
	t.Helper()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Add(-time.Hour)
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{"cluster.local"}, CommonName: "warren e2e root"},
		NotBefore: now, NotAfter: now.Add(48 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "istiod"},
		NotBefore: now, NotAfter: now.Add(48 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames: []string{"istiod.istio-system.svc"}}, root, &srvKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	pemOf := func(typ string, der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}) }
	keyPEM := func(k *ecdsa.PrivateKey) []byte {
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pemOf("EC PRIVATE KEY", der)
	}
	caDir = filepath.Join(dir, "cacerts")
	write := func(path string, b []byte) {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	rootPEM := pemOf("CERTIFICATE", rootDER)
	write(filepath.Join(caDir, "ca-cert.pem"), rootPEM)
	write(filepath.Join(caDir, "ca-key.pem"), keyPEM(rootKey))
	write(filepath.Join(caDir, "root-cert.pem"), rootPEM)
	write(filepath.Join(caDir, "cert-chain.pem"), rootPEM)
	rootFile, certFile, keyFile = filepath.Join(dir, "root-cert.pem"), filepath.Join(dir, "istiod-tls", "tls.crt"), filepath.Join(dir, "istiod-tls", "tls.key")
	write(rootFile, rootPEM)
	write(certFile, pemOf("CERTIFICATE", srvDER))
	write(keyFile, keyPEM(srvKey))
	write(filepath.Join(dir, "istiod-tls", "ca.crt"), rootPEM)
	return caDir, rootFile, certFile, keyFile
}

// applyIstioCRDs creates every CRD of Istio's bundle (those kubetest
// installed already are kept).
func applyIstioCRDs(t *testing.T, env *kubetest.Env, file string) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := apiextclient.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, doc := range bytes.Split(b, []byte("\n---")) {
		var crd apiextensionsv1.CustomResourceDefinition
		if err := yaml.Unmarshal(doc, &crd); err != nil || crd.Kind != "CustomResourceDefinition" {
			continue
		}
		if _, err := cl.ApiextensionsV1().CustomResourceDefinitions().Create(t.Context(), &crd, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatalf("create CRD %s: %v", crd.Name, err)
		}
		n++
	}
	if n < 10 {
		t.Fatalf("only %d CRDs in %s", n, file)
	}
}

// istiodProc is a running pilot-discovery.
type istiodProc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (p *istiodProc) stop() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// startIstiod runs pilot-discovery in the test's network namespace on
// loopback ports, against the test API server, with ambient enabled and
// the agents' ServiceAccount trusted to ask for its node's pods'
// certificates; it returns once the secure xDS port accepts.
func startIstiod(t *testing.T, bin, dir, kubeconfig, caDir, certFile, keyFile, xdsAddr string) *istiodProc {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "mesh.yaml"), []byte("trustDomain: cluster.local\nrootNamespace: istio-system\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// istiod's other listeners get free loopback ports picked here; another
	// test may take one between the pick and istiod's bind, so a start that
	// fails with "address already in use" is tried again with fresh ports.
	for attempt := 1; ; attempt++ {
		p, err := tryStartIstiod(bin, dir, kubeconfig, caDir, certFile, keyFile, xdsAddr,
			freeLoopback(t), freeLoopback(t), freeLoopback(t), freeLoopback(t))
		if err == nil {
			return p
		}
		if attempt < 3 && strings.Contains(err.Error(), "address already in use") {
			t.Logf("istiod start %d: a port was taken meanwhile, trying again: %s", attempt, tail(err.Error(), 2))
			continue
		}
		t.Fatal(err)
	}
}

// tryStartIstiod starts istiod and waits until its xDS port accepts.
func tryStartIstiod(bin, dir, kubeconfig, caDir, certFile, keyFile, xdsAddr, grpcAddr, httpAddr, httpsAddr, monitoringAddr string) (*istiodProc, error) {
	cmd := exec.Command(bin, "discovery", "--kubeconfig", kubeconfig, "--meshConfig", filepath.Join(dir, "mesh.yaml"),
		"--grpcAddr", grpcAddr, "--secureGRPCAddr", xdsAddr, "--httpAddr", httpAddr, "--httpsAddr", httpsAddr,
		"--monitoringAddr", monitoringAddr, "--tlsCertFile", certFile, "--tlsKeyFile", keyFile,
		"--caCertFile", filepath.Join(filepath.Dir(certFile), "ca.crt"), "--domain", "cluster.local", "--log_output_level", "default:info")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "POD_NAMESPACE=istio-system", "POD_NAME=istiod-0", "PILOT_ENABLE_AMBIENT=true",
		"CA_TRUSTED_NODE_ACCOUNTS="+istiodAgentNamespace+"/"+istiodAgentSA, "ROOT_CA_DIR="+caDir, "CLUSTER_ID=Kubernetes",
		"PILOT_ENABLE_CONFIG_DISTRIBUTION_TRACKING=false", "ENABLE_CA_SERVER=true", "KUBECONFIG="+kubeconfig)
	p := &istiodProc{cmd: cmd, out: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = cmd.Wait(); close(p.done) }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", xdsAddr, time.Second); err == nil {
			c.Close()
			return p, nil
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("istiod exited:\n%s", tail(p.out.String(), 60))
		default:
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("istiod's xDS port %s did not open in 60 s:\n%s", xdsAddr, tail(p.out.String(), 60))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitAccessLog returns the first access-log record ("connection closed")
// in the agent's output on node that match accepts, waiting up to 5 s for it.
func waitAccessLog(t *testing.T, m *mesh.Mesh, node string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, l := range strings.Split(m.Agents[node].Output(), "\n") {
			var r map[string]any
			if json.Unmarshal([]byte(l), &r) == nil && r["msg"] == "connection closed" && match(r) {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no matching access-log record from the agent on %s in 5 s", node)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// xdsStatus is the istiod provider's status in /config_dump.
type xdsStatus struct {
	Connected, Synced bool
	Streams           int
	Acks, Nacks       int
	LastNack          string
	Enrolled          []string
}

func providerStatus(t *testing.T, m *mesh.Mesh, n *lab.Node) xdsStatus {
	t.Helper()
	body, err := m.Admin(n, "/config_dump")
	if err != nil {
		t.Fatal(err)
	}
	var dump struct{ Provider xdsStatus }
	if err := json.Unmarshal(body, &dump); err != nil {
		t.Fatalf("/config_dump: %v", err)
	}
	return dump.Provider
}

// TestIstiodMode runs warren under a real istiod: lab pods registered as
// Pods of an ambient namespace, istiod's workload xDS and CA, two agents
// with --provider=istiod --ca-provider=istiod. node1's pods carry
// ambient.istio.io/redirection=enabled from the start (as istio-cni left
// them before a migration from ztunnel); node2's pods do not, and are
// enrolled only through the annotation node2's agent writes.
func TestIstiodMode(t *testing.T) {
	assets := istiodAssets(t)
	c := newCluster(t)
	env := kubetest.StartWith(t, kubetest.Config{ServiceCIDR: "198.18.200.0/24"})
	ctx := t.Context()
	k := env.Kube
	dir := t.TempDir()
	applyIstioCRDs(t, env, filepath.Join(assets, "crd-all.gen.yaml"))

	for _, n := range c.lab.Nodes() {
		if _, err := k.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name()}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, ns := range []string{"istio-system", istiodAgentNamespace} {
		if _, err := k.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, sa := range []struct{ ns, name string }{{istiodAgentNamespace, istiodAgentSA}, {"default", "client"}, {"default", "server"}} {
		if _, err := k.CoreV1().ServiceAccounts(sa.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa.name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setNamespaceLabel(t, env, kube.DefaultEnrollValue)
	for name, sa := range map[string]string{"client1": "client", "client2": "client", "server1": "server", "server2": "server"} {
		uid := registerPod(t, env, c.pod(name), sa, map[string]string{"app": sa})
		if strings.HasSuffix(name, "1") {
			annotate(t, env, name, kube.RedirectionEnabled)
		}
		startPause(t, c.pod(name), uid)
	}
	if _, err := k.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{ClusterIP: mesh.EchoVIP.String(), Selector: map[string]string{"app": "server"},
			Ports: []corev1.ServicePort{{Name: "tcp", Port: 80, TargetPort: intstr.FromInt32(9000)}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	agentPods := map[string]*corev1.Pod{}
	for _, n := range c.lab.Nodes() {
		agentPods[n.Name()] = createPod(t, env, istiodAgentNamespace, istiodAgentSA+"-"+n.Name(), istiodAgentSA, n.Name())
	}

	caDir, rootFile, certFile, keyFile := istiodCerts(t, dir)
	adminKubeconfig := env.Kubeconfig(t, dir, "istiod", nil)
	xdsAddr := freeLoopback(t)
	istiodDir := filepath.Join(dir, "istiod")
	if err := os.MkdirAll(istiodDir, 0o755); err != nil {
		t.Fatal(err)
	}
	istiod := startIstiod(t, filepath.Join(assets, "pilot-discovery"), istiodDir, adminKubeconfig, caDir, certFile, keyFile, xdsAddr)
	t.Cleanup(func() { istiod.stop() })

	host, err := url.Parse(env.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := env.Kubeconfig(t, dir, istiodAgentSA, nil)
	m := &mesh.Mesh{Cluster: c.c, AgentPath: agentPath, Dir: dir, CfgPath: filepath.Join(dir, "unused.yaml"), Agents: map[string]*lab.Process{}}
	t.Cleanup(func() {
		if t.Failed() {
			for name, p := range m.Agents {
				t.Logf("agent on %s:\n%s", name, tail(p.Output(), 80))
			}
			t.Logf("istiod:\n%s", tail(istiod.out.String(), 80))
		}
		m.Stop()
	})
	for _, n := range c.lab.Nodes() {
		token := writeToken(t, dir, "agent-"+n.Name(), requestToken(t, env, istiodAgentNamespace, istiodAgentSA, []string{"istio-ca"}, agentPods[n.Name()]))
		forwardLoopback(t, n, host.Host)
		forwardLoopback(t, n, xdsAddr)
		start := time.Now()
		startWarrenAgent(t, m, n, "--provider", "istiod", "--xds-address", xdsAddr, "--kubeconfig", kubeconfig, "--netns-dirs", "/run/netns",
			"--pod-name", istiodAgentSA+"-"+n.Name(), "--pod-namespace", istiodAgentNamespace, "--instance-ips", n.IPv4().String(), "--cluster-id", "Kubernetes",
			"--ca-provider", "istiod", "--istiod-addr", xdsAddr, "--istiod-root-ca", rootFile, "--istiod-token-file", token)
		t.Logf("agent on %s ready %v after start (istiod xDS + CA)", n.Name(), time.Since(start).Round(time.Millisecond))
	}
	for _, s := range []string{"server1", "server2"} {
		c.serve(t, c.pod(s), "sink", "-l", ":9000")
	}
	c.serve(t, c.pod("server2"), "echo", "-l", ":7000")
	client1 := c.pod("client1")
	server2 := netip.AddrPortFrom(c.pod("server2").IPv4(), 9000)
	echo2 := netip.AddrPortFrom(c.pod("server2").IPv4(), 7000)
	vip := netip.AddrPortFrom(mesh.EchoVIP, 80)
	srcP := "spiffe://cluster.local/ns/default/sa/client"
	tunneled := map[string]string{"reporter": "source", "source_principal": srcP,
		"destination_principal": "spiffe://cluster.local/ns/default/sa/server", "connection_security_policy": "mutual_tls"}
	metric := func(node, name string, want map[string]string) float64 {
		t.Helper()
		v, err := m.Metric(node, name, want)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}

	t.Run("pod to pod and pod to service across nodes", func(t *testing.T) {
		waitServing(t, m, c.lab.Node("node1"), []string{"client1", "server1"})
		waitServing(t, m, c.lab.Node("node2"), []string{"client2", "server2"})
		// node2's pods were not annotated by hand: its agent did it.
		for _, name := range []string{"client2", "server2"} {
			p, err := k.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if v := p.Annotations[kube.RedirectionAnnotation]; v != kube.RedirectionEnabled {
				t.Errorf("%s: annotation %s=%q, want %q written by node2's agent", name, kube.RedirectionAnnotation, v, kube.RedirectionEnabled)
			}
		}
		if _, err := c.c.Source(client1, server2, 1<<20); err != nil {
			t.Fatal(err)
		}
		if _, err := c.c.Source(client1, vip, 1<<20); err != nil {
			t.Fatal(err)
		}
		if got := metric("node1", "istio_tcp_connections_opened_total", tunneled); got != 2 {
			t.Errorf("node1 tunneled connections = %v, want 2 (pod and service VIP)", got)
		}
		// From an agent-annotated pod: client2 → server1 over mutual TLS.
		if _, err := c.c.Source(c.pod("client2"), netip.AddrPortFrom(c.pod("server1").IPv4(), 9000), 1<<20); err != nil {
			t.Fatal(err)
		}
		if got := metric("node2", "istio_tcp_connections_opened_total", tunneled); got != 1 {
			t.Errorf("node2 tunneled connections = %v, want 1 (client2 → server1, mutual_tls)", got)
		}
		// One trace ID for the pod-to-pod connection in both agents' access
		// logs: node1's outbound record of the CONNECT it sent (traceparent),
		// node2's inbound record of the CONNECT it received.
		outbound := waitAccessLog(t, m, "node1", func(r map[string]any) bool {
			return r["direction"] == "outbound" && r["dst.addr"] == server2.String()
		})
		if id, _ := outbound["trace_id"].(string); len(id) != 32 {
			t.Errorf("node1's outbound record %v: no trace_id", outbound)
		} else {
			waitAccessLog(t, m, "node2", func(r map[string]any) bool { return r["direction"] == "inbound" && r["trace_id"] == id })
		}
		for _, n := range []string{"node1", "node2"} {
			for _, ci := range certs(t, m, c.lab.Node(n)) {
				if ci.Provider != "istiod" {
					t.Errorf("%s: %s from %q, want istiod", n, ci.Identity, ci.Provider)
				}
			}
			s := providerStatus(t, m, c.lab.Node(n))
			if !s.Connected || !s.Synced || s.Nacks != 0 {
				t.Errorf("%s: provider status %+v, want connected, synced, no NACK", n, s)
			}
			if p := m.Agents[n]; p != nil {
				if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.PID())); err == nil {
					for _, l := range strings.Split(string(b), "\n") {
						if strings.HasPrefix(l, "VmRSS:") || strings.HasPrefix(l, "VmHWM:") {
							t.Logf("agent on %s (istiod mode, 2 pods): %s", n, strings.Join(strings.Fields(l), " "))
						}
					}
				}
			}
		}
	})

	t.Run("AuthorizationPolicy denies within seconds", func(t *testing.T) {
		if r := c.probe(t, client1, echo2, "before"); r.Reply != "before" {
			t.Fatalf("control: reply %q", r.Reply)
		}
		denied := map[string]string{"reporter": "destination", "response_flags": "DENY"}
		before := metric("node2", "istio_tcp_connections_failed_total", denied)
		ap := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "deny-client", Namespace: "default"},
			Spec: securityapi.AuthorizationPolicy{Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "server"}},
				Action: securityapi.AuthorizationPolicy_DENY,
				Rules:  []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{Principals: []string{"cluster.local/ns/default/sa/client"}}}}}}}}
		applied := time.Now()
		if _, err := env.Istio.SecurityV1().AuthorizationPolicies("default").Create(ctx, ap, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		var enforced time.Duration
		for {
			r, err := c.c.Probe(client1, echo2, "after")
			if err != nil || r.Reply == "" {
				enforced = time.Since(applied)
				break
			}
			if time.Since(applied) > 20*time.Second {
				t.Fatalf("client1 still reaches server2 20 s after the DENY policy was created")
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("apply-to-enforce: DENY created in the API server → refused by node2's agent after %v (istiod watch + push + agent conversion, probe every ~20 ms)", enforced.Round(time.Millisecond))
		if enforced > 5*time.Second {
			t.Errorf("apply-to-enforce %v, want within 5 s", enforced)
		}
		if got := metric("node2", "istio_tcp_connections_failed_total", denied); got < before+1 {
			t.Errorf("DENY failures %v → %v, want counted", before, got)
		}
		if err := env.Istio.SecurityV1().AuthorizationPolicies("default").Delete(ctx, "deny-client", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitReply(t, c, client1, echo2, 10*time.Second)
	})

	t.Run("a resource warren cannot apply is NACKed and the previous state stays", func(t *testing.T) {
		// A Pod elsewhere claiming server2's IP: istiod sends it, warren
		// cannot hold two workloads with one address.
		dup, err := k.CoreV1().Pods("default").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "dup", Labels: map[string]string{"app": "dup"}, Annotations: map[string]string{kube.RedirectionAnnotation: kube.RedirectionEnabled}},
			Spec:       corev1.PodSpec{NodeName: "elsewhere", ServiceAccountName: "default", Containers: []corev1.Container{{Name: "app", Image: "labapp"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		dup.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: server2.Addr().String(), PodIPs: []corev1.PodIP{{IP: server2.Addr().String()}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
		if _, err := k.CoreV1().Pods("default").UpdateStatus(ctx, dup, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		for _, n := range []string{"node1", "node2"} {
			var s xdsStatus
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				if s = providerStatus(t, m, c.lab.Node(n)); strings.Contains(s.LastNack, "/dup") {
					break
				}
			}
			if !strings.Contains(s.LastNack, "/dup") {
				t.Fatalf("%s: no NACK naming dup: %+v", n, s)
			}
			t.Logf("%s NACKed: %s", n, s.LastNack)
		}
		before := metric("node1", "istio_tcp_connections_opened_total", tunneled)
		if _, err := c.c.Source(client1, server2, 1<<16); err != nil {
			t.Fatal(err)
		}
		if got := metric("node1", "istio_tcp_connections_opened_total", tunneled); got != before+1 {
			t.Errorf("server2 no longer reached as itself after the NACK: tunneled %v → %v", before, got)
		}
		if err := k.CoreV1().Pods("default").Delete(ctx, "dup", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("istiod restarted mid-traffic: established connections stay, configuration resumes", func(t *testing.T) {
		streams := providerStatus(t, m, c.lab.Node("node1")).Streams
		established, err := client1.Start(appPath, "rr", "-c", echo2.String(), "-n", "60", "-rate", "10", "-timeout", "30s")
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		istiod.stop()
		time.Sleep(2 * time.Second)
		// While istiod is away the agents keep serving.
		if _, err := c.c.Source(client1, vip, 1<<16); err != nil {
			t.Fatalf("new connection while istiod is down: %v", err)
		}
		istiod = startIstiod(t, filepath.Join(assets, "pilot-discovery"), istiodDir, adminKubeconfig, caDir, certFile, keyFile, xdsAddr)
		if err := established.Wait(); err != nil {
			t.Fatalf("the established connection did not survive istiod's restart: %v", err)
		}
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			s := providerStatus(t, m, c.lab.Node("node1"))
			if s.Connected && s.Streams > streams {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("node1 did not reconnect to the restarted istiod: %+v", s)
			}
		}
	})

	// Also shows that configuration resumes after the restart: the deletion
	// reaches the agents through the restarted istiod's stream.
	t.Run("an opted-out pod loses the annotation and is unenrolled", func(t *testing.T) {
		p, err := k.CoreV1().Pods("default").Get(ctx, "client2", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Labels[kube.DefaultEnrollLabel] = kube.OptOutValue
		if _, err := k.CoreV1().Pods("default").Update(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitServing(t, m, c.lab.Node("node2"), []string{"server2"})
		if p, err = k.CoreV1().Pods("default").Get(ctx, "client2", metav1.GetOptions{}); err != nil {
			t.Fatal(err)
		}
		if v, ok := p.Annotations[kube.RedirectionAnnotation]; ok {
			t.Errorf("client2 opted out: annotation %s=%q still there", kube.RedirectionAnnotation, v)
		}
	})

	t.Run("a deleted pod is unenrolled", func(t *testing.T) {
		if err := k.CoreV1().Pods("default").Delete(ctx, "server1", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
			t.Fatal(err)
		}
		waitServing(t, m, c.lab.Node("node1"), []string{"client1"})
	})
}

// annotate sets the redirection annotation istio-cni would set on an
// ambient pod.
func annotate(t *testing.T, env *kubetest.Env, pod, value string) {
	t.Helper()
	p, err := env.Kube.CoreV1().Pods("default").Get(t.Context(), pod, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	p.Annotations[kube.RedirectionAnnotation] = value
	if _, err := env.Kube.CoreV1().Pods("default").Update(t.Context(), p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// waitReply waits until pod gets a reply from addr.
func waitReply(t *testing.T, c *cluster, pod *lab.Pod, addr netip.AddrPort, within time.Duration) {
	t.Helper()
	var last error
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		r, err := c.c.Probe(pod, addr, "again")
		if err == nil && r.Reply == "again" {
			return
		}
		last = errors.Join(err, fmt.Errorf("reply %q", r.Reply))
	}
	t.Fatalf("%s did not reach %s again within %v: %v", pod.Name(), addr, within, last)
}
