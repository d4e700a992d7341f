package e2e

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

// testMesh wraps mesh.Mesh with helpers that fail the test.
type testMesh struct {
	*cluster
	*mesh.Mesh
	vip netip.Addr
}

func newMesh(t *testing.T) *testMesh {
	t.Helper()
	c := newCluster(t)
	m, err := mesh.New(c.c, agentPath, t.TempDir())
	if m != nil {
		t.Cleanup(func() {
			if t.Failed() {
				for name, p := range m.Agents {
					t.Logf("agent on %s:\n%s", name, p.Output())
				}
			}
			m.Stop()
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	return &testMesh{cluster: c, Mesh: m, vip: mesh.EchoVIP}
}

func (m *testMesh) pod(name string) *lab.Pod { return m.Pod(name) }

func (m *testMesh) workload(name, sa string, extra map[string]any) map[string]any {
	return m.Workload(name, sa, extra)
}

func (m *testMesh) defaultSpec() mesh.Spec { return m.DefaultSpec() }

func (m *testMesh) apply(t *testing.T, spec mesh.Spec) {
	t.Helper()
	if err := m.Apply(spec); err != nil {
		t.Fatal(err)
	}
}

func (m *testMesh) writeRaw(t *testing.T, b []byte) {
	t.Helper()
	if err := m.WriteRaw(b); err != nil {
		t.Fatal(err)
	}
}

func (m *testMesh) status(t *testing.T, n *lab.Node) mesh.ProviderStatus {
	t.Helper()
	st, err := m.Status(n)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (m *testMesh) startAgent(t *testing.T, n *lab.Node, extra []string) *lab.Process {
	t.Helper()
	p, err := m.StartAgent(n, extra)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (m *testMesh) waitReady(t *testing.T, n *lab.Node, proc *lab.Process, addr string) {
	t.Helper()
	if err := m.WaitReady(n, proc, addr); err != nil {
		t.Fatal(err)
	}
}

func (m *testMesh) metric(t *testing.T, node, name string, want map[string]string) float64 {
	t.Helper()
	v, err := m.Metric(node, name, want)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func (m *testMesh) source(t *testing.T, pod *lab.Pod, addr netip.AddrPort, n int64) mesh.SourceResult {
	t.Helper()
	r, err := m.Source(pod, addr, n)
	if err != nil {
		t.Fatal(err)
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
	// node2's agent saw the two cross-node flows (and whichever VIP flows its server got).
	dstLabels := map[string]string{"reporter": "destination", "source_principal": srcP, "destination_principal": dstP, "destination_workload": "server2"}
	opened := m.metric(t, "node2", "istio_tcp_connections_opened_total", dstLabels)
	if opened < 2 {
		t.Errorf("node2 destination-reported opened connections = %v, want >= 2", opened)
	}
	if got := m.metric(t, "node2", "istio_tcp_received_bytes_total", dstLabels); got != opened*(4<<20) {
		t.Errorf("node2 destination-reported received bytes = %v, want %v", got, opened*(4<<20))
	}
	// One JSON access-log line per closed connection on the source side.
	lines := 0
	for _, l := range strings.Split(m.Agents["node1"].Output(), "\n") {
		if strings.Contains(l, `"log":"access"`) && strings.Contains(l, `"reporter":"source"`) {
			var rec map[string]any
			if err := json.Unmarshal([]byte(l), &rec); err != nil {
				t.Errorf("access log line is not JSON: %v: %s", err, l)
			}
			lines++
		}
	}
	if lines != 4 {
		t.Errorf("node1 wrote %d source access-log lines, want 4", lines)
	}
}
