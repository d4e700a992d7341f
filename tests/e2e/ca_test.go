package e2e

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/warren-mesh/warren/pkg/caserver"
	"github.com/warren-mesh/warren/pkg/config/kube"
	"github.com/warren-mesh/warren/pkg/config/kube/kubetest"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/pkg/identity/istioca"
	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

// caCertTTL is the CA service's --cert-max-ttl in this test. Leaves are
// backdated one minute, so a 64 s certificate is renewed at half-life, 2 s
// after issue: rotations are frequent, and an outage expires them in 64 s.
const caCertTTL = 64 * time.Second

// TestCAService runs warren's CA service (`nodeagent ca serve`, the only
// holder of the CA key) against a real API server (envtest: TokenRequest,
// TokenReview, a pod informer), and two agents in Kubernetes mode with
// --ca-provider=warren on the lab, each with a projected-style token
// (TokenRequest bound to its own Pod, audience istio-ca) and the root
// certificate only.
func TestCAService(t *testing.T) {
	c := newCluster(t)
	env := kubetest.StartWith(t, kubetest.Config{ServiceCIDR: "198.18.200.0/24"})
	ctx := t.Context()
	k := env.Kube
	dir := t.TempDir()

	// Nodes, so that bound tokens carry the node's name.
	for _, n := range c.lab.Nodes() {
		if _, err := k.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name()}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := k.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "warren-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, sa := range []struct{ ns, name string }{{"warren-system", "warren-nodeagent"}, {"default", "client"}, {"default", "server"}, {"default", "mover"}, {"default", "lonely"}} {
		if _, err := k.CoreV1().ServiceAccounts(sa.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa.name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// The lab's pods, as the scheduler and kubelet would have them.
	for name, sa := range map[string]string{"client1": "client", "client2": "client", "server1": "server", "server2": "server"} {
		uid := registerPod(t, env, c.pod(name), sa, map[string]string{"app": sa})
		startPause(t, c.pod(name), uid)
	}
	setNamespaceLabel(t, env, kube.DefaultEnrollValue)
	// Each agent's own Pod, which its token is bound to.
	agentPods := map[string]*corev1.Pod{}
	for _, n := range c.lab.Nodes() {
		agentPods[n.Name()] = createPod(t, env, "warren-system", "warren-nodeagent-"+n.Name(), "warren-nodeagent", n.Name())
	}

	// The CA service: its own user with the chart's RBAC, the key in its
	// directory only. Agents get root-cert.pem, a copy of the certificate.
	caDir := filepath.Join(dir, "ca")
	writeCA(t, caDir)
	rootCert := filepath.Join(dir, "root", "root-cert.pem")
	copyFile(t, filepath.Join(caDir, builtinca.CertFile), rootCert)
	grantCA(t, env, "warren-ca")
	caKubeconfig := env.Kubeconfig(t, dir, "warren-ca", []string{"warren:ca"})
	caAddr, caHTTP := freeLoopback(t), freeLoopback(t)
	ca := startCAService(t, caKubeconfig, caDir, caAddr, caHTTP)

	// The agents, each reaching the API server and the CA through loopback
	// forwarders in its node's network namespace.
	host, err := url.Parse(env.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := env.Kubeconfig(t, dir, "warren-nodeagent", nil)
	m := &mesh.Mesh{Cluster: c.c, AgentPath: agentPath, Dir: dir, CfgPath: filepath.Join(dir, "unused.yaml"), Agents: map[string]*lab.Process{}}
	t.Cleanup(func() {
		if t.Failed() {
			for name, p := range m.Agents {
				t.Logf("agent on %s:\n%s", name, p.Output())
			}
			t.Logf("CA service:\n%s", ca.output())
		}
		m.Stop()
	})
	tokens := map[string]string{}
	for _, n := range c.lab.Nodes() {
		tokens[n.Name()] = writeToken(t, dir, "agent-"+n.Name(), requestToken(t, env, "warren-system", "warren-nodeagent", []string{"istio-ca"}, agentPods[n.Name()]))
		forwardLoopback(t, n, host.Host)
		forwardLoopback(t, n, caAddr)
		startWarrenAgent(t, m, n, "--provider", "kubernetes", "--kubeconfig", kubeconfig, "--netns-dirs", "/run/netns",
			"--ca-provider", "warren", "--ca-addr", caAddr, "--ca-root-cert", rootCert, "--ca-token-file", tokens[n.Name()])
	}
	for _, s := range []string{"server1", "server2"} {
		c.serve(t, c.pod(s), "sink", "-l", ":9000")
	}
	c.serve(t, c.pod("server2"), "echo", "-l", ":7000")
	client1 := c.pod("client1")
	server2 := netip.AddrPortFrom(c.pod("server2").IPv4(), 9000)
	echo2 := netip.AddrPortFrom(c.pod("server2").IPv4(), 7000)
	tunneled := map[string]string{"reporter": "source", "source_principal": "spiffe://cluster.local/ns/default/sa/client",
		"destination_principal": "spiffe://cluster.local/ns/default/sa/server", "connection_security_policy": "mutual_tls"}
	clientID := mustID(t, "default", "client")
	serverID := mustID(t, "default", "server")

	t.Run("agents obtain their pods' certificates from the CA and tunnel", func(t *testing.T) {
		waitServing(t, m, c.lab.Node("node1"), []string{"client1", "server1"})
		waitServing(t, m, c.lab.Node("node2"), []string{"client2", "server2"})
		if _, err := c.c.Source(client1, server2, 1<<20); err != nil {
			t.Fatal(err)
		}
		if got, err := m.Metric("node1", "istio_tcp_connections_opened_total", tunneled); err != nil || got != 1 {
			t.Errorf("node1 tunneled connections client→server = %v (%v), want 1", got, err)
		}
		for _, n := range []string{"node1", "node2"} {
			for _, ci := range certs(t, m, c.lab.Node(n)) {
				if ci.Provider != "warren" || ci.State != identity.StateValid {
					t.Errorf("%s: %s from %q is %s (%s), want valid from warren", n, ci.Identity, ci.Provider, ci.State, ci.LastError)
				}
				if d := ci.NotAfter.Sub(ci.NotBefore); d > caCertTTL+time.Minute+time.Second {
					t.Errorf("%s: %s valid for %v, more than the CA's cap", n, ci.Identity, d)
				}
			}
		}
		issued := ca.metric(t, "warren_ca_certificates_issued_total", nil)
		if issued < 4 {
			t.Errorf("CA issued %v certificates, want >= 4 (client and server identities on two nodes)", issued)
		}
		sum, count := ca.metric(t, "warren_ca_request_duration_seconds_sum", nil), ca.metric(t, "warren_ca_request_duration_seconds_count", nil)
		t.Logf("CA: %v certificates issued, mean CreateCertificate time %.1f ms (TokenReview against envtest + pod lookup + ECDSA signing)", issued, 1000*sum/count)
	})

	// What a node agent taken over could try, asked directly with real tokens.
	t.Run("refusals", func(t *testing.T) {
		createPod(t, env, "default", "lonely", "lonely", "node2") // its identity's only pod
		createPod(t, env, "default", "mover", "mover", "node1")   // moves in the next test
		clientTok := writeToken(t, dir, "client1", requestToken(t, env, "default", "client", []string{"istio-ca"}, getPod(t, env, "default", "client1")))
		wrongAud := writeToken(t, dir, "wrong-aud", requestToken(t, env, "warren-system", "warren-nodeagent", []string{"https://kubernetes.default.svc"}, agentPods["node1"]))
		unbound := writeToken(t, dir, "unbound", requestToken(t, env, "warren-system", "warren-nodeagent", []string{"istio-ca"}, nil))
		expired := writeToken(t, dir, "expired", expiredToken(t, env, agentPods["node1"]))
		for _, tt := range []struct {
			name, token string
			id          identity.Identity
			reason      string // "" issued
		}{
			{"node agent for a pod on its node", tokens["node1"], clientID, ""},
			{"node agent for a pod only on another node", tokens["node1"], mustID(t, "default", "lonely"), caserver.ReasonNoPodOnNode},
			{"the other node's agent for it", tokens["node2"], mustID(t, "default", "lonely"), ""},
			{"node agent for an identity no pod has", tokens["node1"], mustID(t, "default", "nobody"), caserver.ReasonNoPodOnNode},
			{"token of another ServiceAccount impersonating", clientTok, serverID, caserver.ReasonNotNodeAgent},
			{"pod's token for its own identity", clientTok, clientID, ""},
			{"expired token", expired, clientID, caserver.ReasonTokenExpired},
			{"token with the wrong audience", wrongAud, clientID, caserver.ReasonWrongAudience},
			{"token bound to no pod", unbound, clientID, caserver.ReasonNotPodBound},
		} {
			t.Run(tt.name, func(t *testing.T) {
				start := time.Now()
				_, _, err := caClient(t, caAddr, rootCert, tt.token).Fetch(ctx, tt.id)
				if tt.reason == "" {
					if err != nil {
						t.Fatalf("refused: %v", err)
					}
					t.Logf("issued %s in %v", tt.id, time.Since(start).Round(100*time.Microsecond))
					return
				}
				if err == nil || !strings.Contains(err.Error(), "refused ("+tt.reason+")") {
					t.Fatalf("got %v, want refusal %s", err, tt.reason)
				}
				t.Logf("refused: %v", err)
			})
		}
		for _, r := range []string{caserver.ReasonNoPodOnNode, caserver.ReasonNotNodeAgent, caserver.ReasonTokenExpired, caserver.ReasonWrongAudience, caserver.ReasonNotPodBound} {
			if got := ca.metric(t, "warren_ca_requests_refused_total", map[string]string{"reason": r}); got < 1 {
				t.Errorf("warren_ca_requests_refused_total{reason=%q} = %v, want >= 1", r, got)
			}
		}
	})

	t.Run("a pod that moves can no longer be signed for by its old node", func(t *testing.T) {
		moverID := mustID(t, "default", "mover")
		if _, _, err := caClient(t, caAddr, rootCert, tokens["node1"]).Fetch(ctx, moverID); err != nil {
			t.Fatalf("while on node1: %v", err)
		}
		// Rescheduled: the Pod is deleted and created again on node2.
		// (There is no kubelet to finish a graceful deletion: force it.)
		if err := k.CoreV1().Pods("default").Delete(ctx, "mover", *metav1.NewDeleteOptions(0)); err != nil {
			t.Fatal(err)
		}
		createPod(t, env, "default", "mover", "mover", "node2")
		moved := time.Now()
		var err1, err2 error
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			_, _, err1 = caClient(t, caAddr, rootCert, tokens["node1"]).Fetch(ctx, moverID)
			_, _, err2 = caClient(t, caAddr, rootCert, tokens["node2"]).Fetch(ctx, moverID)
			if err1 != nil && strings.Contains(err1.Error(), "refused ("+caserver.ReasonNoPodOnNode+")") && err2 == nil {
				t.Logf("node1 refused and node2 signed for %v after the move", time.Since(moved).Round(time.Millisecond))
				return
			}
		}
		t.Fatalf("after the move: node1 %v (want %s), node2 %v (want a certificate)", err1, caserver.ReasonNoPodOnNode, err2)
	})

	t.Run("rate limit per caller", func(t *testing.T) {
		// The pod's own token (its own bucket: ServiceAccount default/client on node1).
		clientTok := filepath.Join(dir, "client1.token")
		cl := caClient(t, caAddr, rootCert, clientTok)
		ok, limited := 0, 0
		start := time.Now()
		for range caserver.DefaultBurst + 20 {
			_, _, err := cl.Fetch(ctx, clientID)
			switch {
			case err == nil:
				ok++
			case strings.Contains(err.Error(), "refused ("+caserver.ReasonRateLimited+")"):
				limited++
			default:
				t.Fatal(err)
			}
		}
		elapsed := time.Since(start)
		t.Logf("%d requests in %v from one caller: %d issued, %d refused rate_limited (burst %d, %d/s)", ok+limited, elapsed.Round(time.Millisecond), ok, limited, caserver.DefaultBurst, caserver.DefaultRate)
		// The burst (less what this caller already used), then DefaultRate a second.
		if max := caserver.DefaultBurst + int(elapsed.Seconds()*caserver.DefaultRate) + 1; limited == 0 || ok > max || ok < caserver.DefaultBurst-5 {
			t.Errorf("issued %d, limited %d in %v: want about the burst issued (at most %d) and the rest limited", ok, limited, elapsed, max)
		}
		// The agents, other callers, are not affected.
		if _, _, err := caClient(t, caAddr, rootCert, tokens["node1"]).Fetch(ctx, clientID); err != nil {
			t.Errorf("node1's agent limited by another caller's bucket: %v", err)
		}
	})

	t.Run("rotation under a running 1 GiB transfer drops nothing", func(t *testing.T) {
		opened, err := m.Metric("node1", "istio_tcp_connections_opened_total", tunneled)
		if err != nil {
			t.Fatal(err)
		}
		serials := map[string]map[string]bool{"node1": {}, "node2": {}}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				for n, id := range map[string]identity.Identity{"node1": clientID, "node2": serverID} {
					body, err := m.Admin(c.lab.Node(n), "/certs")
					var cis []identity.CertInfo
					if err == nil && json.Unmarshal(body, &cis) == nil {
						for _, ci := range cis {
							if ci.Identity == id && ci.Serial != "" {
								serials[n][ci.Serial] = true
							}
						}
					}
				}
				select {
				case <-stop:
					return
				case <-time.After(250 * time.Millisecond):
				}
			}
		}()
		start := time.Now()
		// Paced over 10 s: on a quiet machine 1 GiB takes under 4 s, less
		// than the two rotations (one every ~2 s) the test needs to see.
		r, err := c.c.SourcePaced(client1, server2, 1<<30, 10*time.Second)
		close(stop)
		wg.Wait()
		if err != nil {
			t.Fatalf("1 GiB transfer across rotations: %v", err)
		}
		if r.Bytes != 1<<30 {
			t.Fatalf("sink checked %d bytes, want %d", r.Bytes, 1<<30)
		}
		t.Logf("1 GiB in %v (%.0f MB/s) while node1 held %d client certificates and node2 %d server certificates in turn",
			time.Since(start).Round(time.Millisecond), float64(r.Bytes)/r.Seconds/1e6, len(serials["node1"]), len(serials["node2"]))
		if len(serials["node1"]) < 3 || len(serials["node2"]) < 3 {
			t.Errorf("no rotation during the transfer: node1 serials %v, node2 serials %v", serials["node1"], serials["node2"])
		}
		if got, _ := m.Metric("node1", "istio_tcp_connections_opened_total", tunneled); got != opened+1 {
			t.Errorf("tunneled connections went from %v to %v: want exactly one (no reconnect)", opened, got)
		}
		// New connections after the rotations use the new certificates.
		if got := c.probe(t, client1, echo2, "after rotation"); got.Reply != "after rotation" {
			t.Errorf("probe after rotation: %+v", got)
		}
	})

	t.Run("CA outage keeps identities until they expire, and readiness says why", func(t *testing.T) {
		ca.stop(t)
		down := time.Now()
		// Certificates already held keep serving new connections.
		if got := c.probe(t, client1, echo2, "CA down"); got.Reply != "CA down" {
			t.Fatalf("probe with the CA down: %+v", got)
		}
		if code, body, err := mesh.NodeGet(c.lab.Node("node1"), "http://"+c.lab.Node("node1").IPv4().String()+":15021/healthz/ready"); err != nil || code != http.StatusOK {
			t.Errorf("node1 not ready right after the CA went down, with valid certificates: %d %s %v", code, body, err)
		}
		// Once they expire, readiness names the identity, the provider and the cause.
		var code int
		var body string
		for deadline := time.Now().Add(caCertTTL + 30*time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
			code, body, err = mesh.NodeGet(c.lab.Node("node1"), "http://"+c.lab.Node("node1").IPv4().String()+":15021/healthz/ready")
			if err == nil && code == http.StatusServiceUnavailable {
				break
			}
		}
		if code != http.StatusServiceUnavailable {
			t.Fatalf("node1 still ready %v after the CA went down (certificates valid for %v)", time.Since(down).Round(time.Second), caCertTTL)
		}
		t.Logf("node1 not ready %v after the CA went down: %s", time.Since(down).Round(time.Second), strings.TrimSpace(body))
		for _, want := range []string{"(provider warren)", clientID.String(), "CA unreachable at " + caAddr} {
			if !strings.Contains(body, want) {
				t.Errorf("readiness %q does not say %q", body, want)
			}
		}
		for _, ci := range certs(t, m, c.lab.Node("node1")) {
			if ci.State == identity.StateValid || !strings.Contains(ci.LastError, "CA unreachable") {
				t.Errorf("after expiry /certs says %s is %s (%s)", ci.Identity, ci.State, ci.LastError)
			}
		}
	})
}

// caProcess is `nodeagent ca serve` running in the test's network namespace.
type caProcess struct {
	cmd      *exec.Cmd
	out      *lockedBuffer
	httpAddr string
	done     chan struct{}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startCAService(t *testing.T, kubeconfig, caDir, addr, httpAddr string) *caProcess {
	t.Helper()
	p := &caProcess{out: &lockedBuffer{}, httpAddr: httpAddr, done: make(chan struct{})}
	p.cmd = exec.Command(agentPath, "ca", "serve", "--kubeconfig", kubeconfig, "--ca-dir", caDir,
		"--listen", addr, "--http-addr", httpAddr, "--serving-names", "127.0.0.1", "--cert-max-ttl", caCertTTL.String(),
		"--node-agent-sa", "warren-system/warren-nodeagent", "--serving-cert-ttl", "10m")
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.stop(t) })
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		select {
		case <-p.done:
			t.Fatalf("CA service exited:\n%s", p.output())
		default:
		}
		resp, err := http.Get("http://" + httpAddr + "/healthz/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("CA service not ready: %v\n%s", err, p.output())
		}
	}
}

func (p *caProcess) output() string { return p.out.String() }

// stop ends the CA service (SIGKILL: an outage, not a drain).
func (p *caProcess) stop(t *testing.T) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Kill()
	<-p.done
}

func (p *caProcess) metric(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + p.httpAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if labels != nil {
		return mesh.SumSeries(string(b), name, labels)
	}
	for _, l := range strings.Split(string(b), "\n") { // a series without labels
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", l, err)
			}
			return f
		}
	}
	return 0
}

// startWarrenAgent starts n's agent as mesh.StartAgent does, without --ca-dir:
// with --ca-provider=warren the agent holds no CA directory at all.
func startWarrenAgent(t *testing.T, m *mesh.Mesh, n *lab.Node, extra ...string) {
	t.Helper()
	args := append([]string{"run", "--config", m.CfgPath, "--node", n.Name(),
		"--cgroup-root", n.CgroupRoot(), "--pin-dir", n.PinDir(),
		"--exempt-sources", n.IPv4().String() + "," + n.IPv6().String(), "--drain-timeout", "5s",
		"--state-dir", m.StateDir(n), "--log-level", "debug"}, extra...)
	proc, err := n.Start(m.AgentPath, args...)
	if err != nil {
		t.Fatal(err)
	}
	m.Agents[n.Name()] = proc
	if err := m.WaitReady(n, proc, n.IPv4().String()+":15021"); err != nil {
		t.Fatal(err)
	}
}

func certs(t *testing.T, m *mesh.Mesh, n *lab.Node) []identity.CertInfo {
	t.Helper()
	body, err := m.Admin(n, "/certs")
	if err != nil {
		t.Fatal(err)
	}
	var cis []identity.CertInfo
	if err := json.Unmarshal(body, &cis); err != nil {
		t.Fatalf("/certs: %v: %s", err, body)
	}
	return cis
}

func mustID(t *testing.T, ns, sa string) identity.Identity {
	t.Helper()
	id, err := identity.New("cluster.local", ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// caClient is the agents' client (pkg/identity/istioca) with a token file.
func caClient(t *testing.T, addr, rootFile, tokenFile string) *istioca.Client {
	t.Helper()
	b, err := os.ReadFile(rootFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(b)
	host, _, _ := net.SplitHostPort(addr)
	cl, err := istioca.New(istioca.Options{Addr: addr, TokenFile: tokenFile, TTL: time.Hour,
		TLS: &tls.Config{RootCAs: roots, ServerName: host, MinVersion: tls.VersionTLS12}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// createPod creates a scheduled Pod (no lab pod behind it: the CA reads
// only its node and ServiceAccount).
func createPod(t *testing.T, env *kubetest.Env, ns, name, sa, node string) *corev1.Pod {
	t.Helper()
	p, err := env.Kube.CoreV1().Pods(ns).Create(t.Context(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "labapp"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func getPod(t *testing.T, env *kubetest.Env, ns, name string) *corev1.Pod {
	t.Helper()
	p, err := env.Kube.CoreV1().Pods(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// requestToken asks the TokenRequest API for a token of ns/sa with the
// audiences, bound to pod (as a projected serviceAccountToken volume's),
// or to nothing when pod is nil.
func requestToken(t *testing.T, env *kubetest.Env, ns, sa string, aud []string, pod *corev1.Pod) string {
	t.Helper()
	exp := int64(3600)
	req := &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: aud, ExpirationSeconds: &exp}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := env.Kube.CoreV1().ServiceAccounts(ns).CreateToken(t.Context(), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s/%s: %v", ns, sa, err)
	}
	return tr.Status.Token
}

func writeToken(t *testing.T, dir, name, token string) string {
	t.Helper()
	path := filepath.Join(dir, name+".token")
	if err := os.WriteFile(path, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// expiredToken signs, with the API server's own service-account key, the
// token TokenRequest would have issued for the node agent's pod an hour ago
// with a ten-minute lifetime (TokenRequest itself refuses lifetimes under
// ten minutes, and a test cannot wait for one to run out).
func expiredToken(t *testing.T, env *kubetest.Env, pod *corev1.Pod) string {
	t.Helper()
	issuer, keyFile := env.ServiceAccountSigner()
	b, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s: no PEM", keyFile)
	}
	key, err := parseSigner(block)
	if err != nil {
		t.Fatalf("%s: %v", keyFile, err)
	}
	sa, err := env.Kube.CoreV1().ServiceAccounts(pod.Namespace).Get(t.Context(), pod.Spec.ServiceAccountName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	kid := sha256.Sum256(der)
	iat := time.Now().Add(-time.Hour)
	enc := func(v any) string {
		j, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(j)
	}
	alg := "RS256"
	if _, ok := key.(*ecdsa.PrivateKey); ok {
		alg = "ES256"
	}
	signing := enc(map[string]string{"alg": alg, "kid": base64.RawURLEncoding.EncodeToString(kid[:])}) + "." + enc(map[string]any{
		"iss": issuer, "aud": []string{"istio-ca"}, "sub": "system:serviceaccount:" + pod.Namespace + ":" + sa.Name,
		"iat": iat.Unix(), "nbf": iat.Unix(), "exp": iat.Add(10 * time.Minute).Unix(), "jti": "expired-test-token",
		"kubernetes.io": map[string]any{"namespace": pod.Namespace,
			"pod":            map[string]string{"name": pod.Name, "uid": string(pod.UID)},
			"serviceaccount": map[string]string{"name": sa.Name, "uid": string(sa.UID)}},
	})
	h := sha256.Sum256([]byte(signing))
	var sig []byte
	switch k := key.(type) {
	case *rsa.PrivateKey:
		sig, err = rsa.SignPKCS1v15(rand.Reader, k, crypto.SHA256, h[:])
	case *ecdsa.PrivateKey:
		var r, s *big.Int
		if r, s, err = ecdsa.Sign(rand.Reader, k, h[:]); err == nil {
			sig = append(r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))...) // JWS ES256: r || s
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// parseSigner parses envtest's service-account key (RSA or ECDSA P-256).
func parseSigner(block *pem.Block) (crypto.Signer, error) {
	if k, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	if k, err := x509.ParseECPrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	switch k := k.(type) {
	case *rsa.PrivateKey:
		return k, nil
	case *ecdsa.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("key of type %T", k)
}

// grantCA gives user the CA service's RBAC from the chart: create
// TokenReviews, read pods.
func grantCA(t *testing.T, env *kubetest.Env, user string) {
	t.Helper()
	rbac := env.Kube.RbacV1()
	if _, err := rbac.ClusterRoles().Create(t.Context(), &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "warren-ca"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}},
	}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := rbac.ClusterRoleBindings().Create(t.Context(), &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "warren-ca"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "warren-ca"},
		Subjects: []rbacv1.Subject{{Kind: "User", APIGroup: "rbac.authorization.k8s.io", Name: user}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// freeLoopback returns a 127.0.0.1 address with a port free right now.
func freeLoopback(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
