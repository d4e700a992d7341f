package e2e

import (
	"encoding/json"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/warren-mesh/warren/pkg/identity/spire/spiretest"
	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

// Two agents with --ca-provider=spire: every workload SVID comes from a
// real SPIRE agent's Delegated Identity API, the agents tunnel between each
// other with them, and the SVIDs rotate without a restart while traffic
// goes on. (One SPIRE agent serves both lab nodes: its sockets are
// filesystem paths, reachable from every network namespace.)
func TestSPIREAgents(t *testing.T) {
	const td = "cluster.local"
	const delegate = "spiffe://" + td + "/warren/nodeagent"
	c := newCluster(t)
	e := spiretest.Start(t, spiretest.Options{TrustDomain: td, Delegates: []string{delegate}})
	e.RegisterSelf(t, delegate) // the agents run as this test's user
	for _, sa := range []string{"client", "server"} {
		e.Register(t, "spiffe://"+td+"/ns/default/sa/"+sa, 20*time.Second, "k8s:ns:default", "k8s:sa:"+sa)
	}
	dir := t.TempDir()
	m := &mesh.Mesh{Cluster: c.c, AgentPath: agentPath, Dir: dir, CfgPath: filepath.Join(dir, "mesh.yaml"),
		Agents: map[string]*lab.Process{}, CAArgs: []string{"--ca-provider", "spire", "--spire-admin-socket", e.AdminSocket}}
	t.Cleanup(func() {
		if t.Failed() {
			for name, p := range m.Agents {
				t.Logf("agent on %s:\n%s", name, tail(p.Output(), 40))
			}
		}
		m.Stop()
	})
	if err := m.Apply(m.DefaultSpec()); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.lab.Nodes() {
		if _, err := m.StartAgent(n, nil); err != nil {
			t.Fatal(err)
		}
	}
	c.serve(t, c.pod("server2"), "echo", "-l", ":7000")
	echo := netip.AddrPortFrom(c.pod("server2").IPv4(), 7000)
	if r := c.probe(t, c.pod("client1"), echo, "spire"); r.Reply != "spire" {
		t.Fatalf("reply %q", r.Reply)
	}
	tunneled := map[string]string{"reporter": "source", "connection_security_policy": "mutual_tls",
		"source_principal": "spiffe://" + td + "/ns/default/sa/client", "destination_principal": "spiffe://" + td + "/ns/default/sa/server"}
	if v, err := m.Metric("node1", "istio_tcp_connections_opened_total", tunneled); err != nil || v < 1 {
		t.Fatalf("tunneled connections with SPIRE identities = %v, %v", v, err)
	}

	type cert struct {
		Identity string
		Provider string
		State    string
		Serial   string
	}
	certs := func(node string) map[string]cert {
		body, err := m.Admin(c.lab.Node(node), "/certs")
		if err != nil {
			t.Fatal(err)
		}
		var cs []cert
		if err := json.Unmarshal(body, &cs); err != nil {
			t.Fatalf("/certs %s: %v", body, err)
		}
		out := map[string]cert{}
		for _, x := range cs {
			if x.Provider != "spire" {
				t.Errorf("%s: %s issued by %q, want spire", node, x.Identity, x.Provider)
			}
			out[x.Identity] = x
		}
		return out
	}
	first := certs("node2")
	server := "spiffe://" + td + "/ns/default/sa/server"
	if first[server].Serial == "" {
		t.Fatalf("node2 holds no server SVID: %+v", first)
	}
	// 20 s SVIDs: SPIRE renews at half-life; traffic keeps flowing across it.
	deadline := time.Now().Add(60 * time.Second)
	for n := 0; ; n++ {
		if r := c.probe(t, c.pod("client1"), echo, "during"); r.Reply != "during" {
			t.Fatalf("probe %d during rotation: reply %q", n, r.Reply)
		}
		if now := certs("node2")[server]; now.Serial != first[server].Serial && now.State == "valid" {
			t.Logf("server SVID rotated without a restart: serial %s → %s after %d probes", first[server].Serial, now.Serial, n)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no rotation within 60 s: %+v", certs("node2"))
		}
		time.Sleep(500 * time.Millisecond)
	}
	if r := c.probe(t, c.pod("client1"), echo, "after"); r.Reply != "after" {
		t.Fatalf("after rotation: reply %q", r.Reply)
	}
}
