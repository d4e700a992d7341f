package e2e

import (
	"bufio"
	"context"
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
	"text/template"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

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
}

const meshConfig = `# written by tests/e2e
workloads:
{{- range .Workloads }}
- uid: lab//v1/Pod/{{ .NS }}/{{ .Name }}
  name: {{ .Name }}
  namespace: {{ .NS }}
  serviceAccount: {{ .SA }}
  workloadIps: ["{{ .V4 }}", "{{ .V6 }}"]
  protocol: {{ .Proto }}
  node: {{ .Node }}
  netnsPath: {{ .Netns }}
  {{- if .Services }}
  services:
    "default/echo.default.svc.cluster.local":
      80: 9000
  {{- end }}
{{- end }}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/{{ .VIP }}"]
  ports:
    80: 9000
{{ .Policies }}
peerAuthentications:
- name: default
  namespace: istio-system
  scope: Global
  mode: {{ .Mode }}
`

type meshWorkload struct {
	Name, NS, SA, Proto, Node, Netns string
	V4, V6                           netip.Addr
	Services                         bool
}

// writeConfig renders the mesh's configuration file: client1, server1,
// client2 and server2 in the mesh (the servers back the echo service), the
// outside pod not in it.
func (m *mesh) writeConfig(t *testing.T, policies, mode string) {
	t.Helper()
	var ws []meshWorkload
	for _, name := range []string{"client1", "server1", "client2", "server2"} {
		p := m.pod(name)
		sa := "client"
		if strings.HasPrefix(name, "server") {
			sa = "server"
		}
		ws = append(ws, meshWorkload{Name: name, NS: "default", SA: sa, Proto: "HBONE", Node: p.Node().Name(),
			Netns: p.NetNSPath(), V4: p.IPv4(), V6: p.IPv6(), Services: sa == "server"})
	}
	if policies == "" {
		policies = "policies: []"
	} else {
		policies = "policies:\n" + policies
	}
	tmpl := template.Must(template.New("cfg").Parse(meshConfig))
	var b strings.Builder
	if err := tmpl.Execute(&b, map[string]any{"Workloads": ws, "VIP": m.vip, "Policies": policies, "Mode": mode}); err != nil {
		t.Fatal(err)
	}
	// Replace atomically, as an operator's tooling would.
	tmp := m.cfgPath + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, m.cfgPath); err != nil {
		t.Fatal(err)
	}
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
	m.writeConfig(t, "", "PERMISSIVE")
	for _, n := range c.lab.Nodes() {
		m.startAgent(t, n)
	}
	return m
}

func (m *mesh) startAgent(t *testing.T, n *lab.Node) *lab.Process {
	t.Helper()
	proc, err := n.Start(agentPath, "run",
		"--config", m.cfgPath, "--node", n.Name(), "--ca-dir", filepath.Join(m.dir, "ca"),
		"--cgroup-root", n.CgroupRoot(), "--pin-dir", n.PinDir(),
		"--exempt-sources", n.IPv4().String()+","+n.IPv6().String(), "--drain-timeout", "5s")
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
	m.waitReady(t, n, proc)
	return proc
}

func (m *mesh) waitReady(t *testing.T, n *lab.Node, proc *lab.Process) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		select {
		case <-proc.Done():
			t.Fatalf("agent on %s exited: %v", n.Name(), proc.Wait())
		default:
		}
		code, body, err := nodeGet(n, fmt.Sprintf("http://%s/healthz/ready", net.JoinHostPort(n.IPv4().String(), "15021")))
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
