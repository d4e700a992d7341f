package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"

	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/tests/lab"
)

var agentPath string

// mesh is the cluster with one node agent per node.
type mesh struct {
	*cluster
	dir     string
	cfgPath string
	agents  map[string]*lab.Process
	vip     netip.Addr
	applied []byte // the last file apply wrote
}

// meshSpec is the configuration file's content: workloads (client1, server1,
// client2, server2 by default; the outside pod is never in the mesh),
// services, policies and the mesh-wide peer-authentication mode.
type meshSpec struct {
	Workloads []map[string]any
	Services  []map[string]any
	Policies  []map[string]any
	Mode      string
}

// workload returns the configuration entry of a lab pod.
func (m *mesh) workload(name, sa string, extra map[string]any) map[string]any {
	p := m.pod(name)
	w := map[string]any{
		"uid": "lab//v1/Pod/default/" + name, "name": name, "namespace": "default", "serviceAccount": sa,
		"workloadIps": []string{p.IPv4().String(), p.IPv6().String()}, "protocol": "HBONE",
		"node": p.Node().Name(), "netnsPath": p.NetNSPath(),
	}
	for k, v := range extra {
		w[k] = v
	}
	return w
}

// defaultSpec: the four mesh pods, the echo service (VIP port 80 → 9000) on
// both servers, no policies, PERMISSIVE.
func (m *mesh) defaultSpec() meshSpec {
	echo := map[string]any{"services": map[string]any{"default/echo.default.svc.cluster.local": map[string]int{"80": 9000}}}
	return meshSpec{
		Workloads: []map[string]any{
			m.workload("client1", "client", nil), m.workload("server1", "server", echo),
			m.workload("client2", "client", nil), m.workload("server2", "server", echo),
		},
		Services: []map[string]any{{
			"name": "echo", "namespace": "default", "hostname": "echo.default.svc.cluster.local",
			"vips": []string{"/" + m.vip.String()}, "ports": map[string]int{"80": 9000},
		}},
		Mode: "PERMISSIVE",
	}
}

// apply writes spec to the configuration file, atomically as an operator's
// tooling would, and waits until both agents run it.
func (m *mesh) apply(t *testing.T, spec meshSpec) {
	t.Helper()
	doc := map[string]any{"workloads": spec.Workloads, "services": spec.Services, "policies": spec.Policies,
		"peerAuthentications": []map[string]any{{"name": "default", "namespace": "istio-system", "scope": "Global", "mode": spec.Mode}}}
	if spec.Policies == nil {
		doc["policies"] = []any{}
	}
	b, err := yaml.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	m.writeRaw(t, b)
	m.applied = b
	sum := fmt.Sprintf("%x", sha256.Sum256(b))
	for _, n := range m.lab.Nodes() {
		if m.agents[n.Name()] != nil {
			m.waitConfig(t, n, sum)
		}
	}
}

// writeRaw replaces the configuration file with b.
func (m *mesh) writeRaw(t *testing.T, b []byte) {
	t.Helper()
	tmp := m.cfgPath + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, m.cfgPath); err != nil {
		t.Fatal(err)
	}
}

// providerStatus is the config provider's state in /config_dump.
type providerStatus struct {
	SHA256     string
	LastError  string
	Rejections uint64
}

func (m *mesh) status(t *testing.T, n *lab.Node) providerStatus {
	t.Helper()
	code, body, err := nodeGet(n, "http://127.0.0.1:15000/config_dump")
	if err != nil || code != 200 {
		t.Fatalf("config_dump on %s: %d %v %s", n.Name(), code, err, body)
	}
	var dump struct{ Provider providerStatus }
	if err := json.Unmarshal([]byte(body), &dump); err != nil {
		t.Fatalf("config_dump on %s: %v", n.Name(), err)
	}
	return dump.Provider
}

// waitConfig waits until n's agent applies the file version with sha256 sum.
func (m *mesh) waitConfig(t *testing.T, n *lab.Node, sum string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var st providerStatus
	for time.Now().Before(deadline) {
		if st = m.status(t, n); st.SHA256 == sum {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("agent on %s did not apply the new configuration: %+v", n.Name(), st)
}

func newMesh(t *testing.T) *mesh {
	t.Helper()
	c := newCluster(t)
	if _, err := c.lab.Node("node2").AddPod("outside"); err != nil {
		t.Fatal(err)
	}
	c.pods["outside"] = c.lab.Node("node2").Pods()[2]
	if agentPath == "" {
		var err error
		if agentPath, err = lab.BuildCommand(binDir, "github.com/warren-mesh/warren/cmd/nodeagent"); err != nil {
			t.Fatal(err)
		}
	}
	m := &mesh{cluster: c, dir: t.TempDir(), agents: map[string]*lab.Process{}, vip: netip.MustParseAddr("198.18.200.10")}
	m.cfgPath = filepath.Join(m.dir, "mesh.yaml")
	caDir := filepath.Join(m.dir, "ca")
	cert, key, err := builtinca.GenerateRoot(builtinca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")})
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(caDir, 0o700)
	os.WriteFile(filepath.Join(caDir, builtinca.CertFile), cert, 0o644)
	os.WriteFile(filepath.Join(caDir, builtinca.KeyFile), key, 0o600)
	m.apply(t, m.defaultSpec())
	for _, n := range c.lab.Nodes() {
		m.startAgent(t, n, nil)
	}
	return m
}

// startAgent runs a node agent on n with extra flags.
func (m *mesh) startAgent(t *testing.T, n *lab.Node, extra []string) *lab.Process {
	t.Helper()
	args := append([]string{"run",
		"--config", m.cfgPath, "--node", n.Name(), "--ca-dir", filepath.Join(m.dir, "ca"),
		"--cgroup-root", n.CgroupRoot(), "--pin-dir", n.PinDir(),
		"--exempt-sources", n.IPv4().String() + "," + n.IPv6().String(), "--drain-timeout", "5s"}, extra...)
	proc, err := n.Start(agentPath, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		proc.Stop()
		if t.Failed() {
			t.Logf("agent on %s:\n%s", n.Name(), proc.Output())
		}
	})
	m.agents[n.Name()] = proc
	readyAddr := n.IPv4().String() + ":15021"
	for i, a := range extra {
		if a == "--ready-addr" && i+1 < len(extra) {
			readyAddr = extra[i+1]
		}
	}
	m.waitReady(t, n, proc, readyAddr)
	return proc
}

func (m *mesh) waitReady(t *testing.T, n *lab.Node, proc *lab.Process, addr string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		select {
		case <-proc.Done():
			t.Fatalf("agent on %s exited: %v", n.Name(), proc.Wait())
		default:
		}
		code, body, err := nodeGet(n, "http://"+addr+"/healthz/ready")
		if err == nil && code == http.StatusOK {
			return
		}
		last = fmt.Sprint(code, " ", body, " ", err)
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("agent on %s not ready: %s\n%s", n.Name(), last, proc.Output())
}

// nodeGet fetches url from inside the node's network namespace.
func nodeGet(n *lab.Node, url string) (int, string, error) {
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
		err = n.Do(func() error {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// metric returns the sum of a counter's series whose labels include all of want.
func (m *mesh) metric(t *testing.T, node, name string, want map[string]string) float64 {
	t.Helper()
	n := m.lab.Node(node)
	code, body, err := nodeGet(n, fmt.Sprintf("http://%s/metrics", net.JoinHostPort(n.IPv4().String(), "15020")))
	if err != nil || code != 200 {
		t.Fatalf("metrics of %s: %d %v", node, code, err)
	}
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(line, fmt.Sprintf("%s=%q", k, v)) {
				ok = false
			}
		}
		if ok {
			var v float64
			fmt.Sscan(line[strings.LastIndex(line, " ")+1:], &v)
			sum += v
		}
	}
	return sum
}

type sourceResult struct {
	Bytes int64
	OK    bool
	Local string
}

// source sends n bytes from pod to addr (a sink) and checks the sink's sha256.
func (m *mesh) source(t *testing.T, pod *lab.Pod, addr netip.AddrPort, n int64) sourceResult {
	t.Helper()
	proc, err := pod.Start(appPath, "source", "-c", addr.String(), "-n", fmt.Sprint(n), "-timeout", "120s")
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.Wait(); err != nil {
		t.Fatalf("source %s -> %s: %v", pod.Name(), addr, err)
	}
	var r sourceResult
	if err := json.Unmarshal([]byte(proc.Output()), &r); err != nil || !r.OK {
		t.Fatalf("source %s -> %s: %q %v", pod.Name(), addr, proc.Output(), err)
	}
	return r
}

func TestMeshTraffic(t *testing.T) {
	m := newMesh(t)
	for _, s := range []string{"server1", "server2"} {
		m.serve(t, m.pod(s), "sink", "-l", ":9000")
	}
	client := m.pod("client1")
	cases := []struct {
		name string
		dst  netip.AddrPort
	}{
		{"across nodes v4", netip.AddrPortFrom(m.pod("server2").IPv4(), 9000)},
		{"across nodes v6", netip.AddrPortFrom(m.pod("server2").IPv6(), 9000)},
		{"same node", netip.AddrPortFrom(m.pod("server1").IPv4(), 9000)},
		{"service VIP", netip.AddrPortFrom(m.vip, 80)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m.source(t, client, tc.dst, 4<<20)
		})
	}
	srcP := "spiffe://cluster.local/ns/default/sa/client"
	dstP := "spiffe://cluster.local/ns/default/sa/server"
	labels := map[string]string{"reporter": "source", "source_principal": srcP, "destination_principal": dstP, "connection_security_policy": "mutual_tls"}
	if got := m.metric(t, "node1", "istio_tcp_connections_opened_total", labels); got != 4 {
		t.Errorf("node1 source-reported opened connections = %v, want 4", got)
	}
	if got := m.metric(t, "node1", "istio_tcp_received_bytes_total", labels); got != 4*(4<<20) {
		t.Errorf("node1 source-reported received bytes = %v, want %d", got, 4*(4<<20))
	}
	dstLabels := map[string]string{"reporter": "destination", "source_principal": srcP, "destination_principal": dstP}
	if got := m.metric(t, "node2", "istio_tcp_connections_opened_total", dstLabels); got < 2 {
		t.Errorf("node2 destination-reported opened connections = %v, want >= 2", got)
	}
}
