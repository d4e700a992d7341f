package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSameNodeFastPath: with --same-node-fast-path, two enrolled pods of
// one node talk without a tunnel and everything HBONE showed stays: the
// bytes arrive intact and counted, the app sees the client pod's address,
// both principals and mutual_tls in the metrics and both access-log
// records (marked same_node), a DENY policy on the client's identity
// refuses it (DENY at the destination), and a STRICT destination still
// refuses plaintext from an unenrolled pod of the same node while the
// enrolled client gets through.
func TestSameNodeFastPath(t *testing.T) {
	t.Setenv("WARREN_SAME_NODE_FAST_PATH", "true") // inherited by the agents: --same-node-fast-path
	m := newMesh(t)
	client, server := m.pod("client1"), m.pod("server1") // both on node1
	m.serve(t, server, "sink", "-l", ":9000")
	m.serve(t, server, "whoami", "-l", ":8080")
	m.serve(t, server, "echo", "-l", ":7000")
	srcP, dstP := "spiffe://cluster.local/ns/default/sa/client", "spiffe://cluster.local/ns/default/sa/server"
	tcp := func(reporter, name string, extra map[string]string) float64 {
		want := map[string]string{"reporter": reporter, "source_principal": srcP, "destination_principal": dstP,
			"destination_workload": "server1", "connection_security_policy": "mutual_tls"}
		for k, v := range extra {
			want[k] = v
		}
		return m.metric(t, "node1", name, want)
	}

	t.Run("traffic, identities and bytes", func(t *testing.T) {
		const n = 16 << 20
		for _, dst := range []netip.AddrPort{netip.AddrPortFrom(server.IPv4(), 9000), netip.AddrPortFrom(server.IPv6(), 9000)} {
			m.source(t, client, dst, n)
		}
		for _, reporter := range []string{"source", "destination"} {
			if got := tcp(reporter, "istio_tcp_connections_opened_total", nil); got != 2 {
				t.Errorf("%s-reported opened connections = %v, want 2", reporter, got)
			}
			if got := tcp(reporter, "istio_tcp_received_bytes_total", nil); got != 2*n {
				t.Errorf("%s-reported received bytes = %v, want %d", reporter, got, 2*n)
			}
		}
		recs := map[string]int{}
		for _, l := range strings.Split(m.Agents["node1"].Output(), "\n") {
			if !strings.Contains(l, `"log":"access"`) {
				continue
			}
			var rec map[string]any
			if err := json.Unmarshal([]byte(l), &rec); err != nil {
				t.Fatalf("access log line is not JSON: %v: %s", err, l)
			}
			if rec["same_node"] != true || rec["security"] != "mutual_tls" || rec["src.identity"] != srcP || rec["dst.identity"] != dstP || rec["hbone.addr"] != nil {
				t.Errorf("access-log record of a same-node connection: %s", l)
			}
			recs[rec["direction"].(string)]++
		}
		if recs["outbound"] != 2 || recs["inbound"] != 2 {
			t.Errorf("access-log records by direction: %v, want 2 outbound and 2 inbound", recs)
		}
	})

	t.Run("the app sees the client pod", func(t *testing.T) {
		for _, dst := range []netip.AddrPort{netip.AddrPortFrom(server.IPv4(), 8080), netip.AddrPortFrom(server.IPv6(), 8080)} {
			msg := strings.Repeat("y", 100000)
			r := m.probe(t, client, dst, msg)
			local, seen := whoami(t, r.Reply)
			if want := addrOf(client, dst.Addr()); seen.Addr().Unmap() != want {
				t.Errorf("app saw the client as %s, want %s", seen, want)
			}
			if unmapped(local) != dst {
				t.Errorf("app's local address %s, want %s", local, dst)
			}
			if !strings.HasSuffix(r.Reply, "\n"+msg) {
				t.Errorf("echo of %d bytes came back as %d bytes", len(msg), len(r.Reply))
			}
		}
	})

	reaches := func(from string, to netip.AddrPort) bool {
		out, err := m.run(t, m.pod(from), "probe", "-c", to.String(), "-m", "hi", "-timeout", "5s")
		return err == nil && strings.Contains(out, `"reply":"hi"`)
	}
	echoAt := netip.AddrPortFrom(server.IPv4(), 7000)

	t.Run("DENY policy", func(t *testing.T) {
		spec := m.defaultSpec()
		spec.Policies = []map[string]any{{"name": "deny-client", "namespace": "default", "scope": "Namespace", "action": "Deny",
			"rules": [][][]map[string]any{{{{"principals": []string{"cluster.local/ns/default/sa/client"}}}}}}}
		m.apply(t, spec)
		deny := map[string]string{"response_flags": "DENY"}
		before := tcp("destination", "istio_tcp_connections_failed_total", deny)
		if reaches("client1", echoAt) {
			t.Fatal("a denied principal got through")
		}
		if got := tcp("destination", "istio_tcp_connections_failed_total", deny) - before; got != 1 {
			t.Errorf("DENY failures rose by %v, want 1", got)
		}
		m.apply(t, m.defaultSpec())
		if !reaches("client1", echoAt) {
			t.Fatal("refused once the policy was gone")
		}
	})

	t.Run("STRICT refuses plaintext from an unenrolled pod of the node", func(t *testing.T) {
		if err := m.AddPod(m.lab.Node("node1"), "outside1"); err != nil {
			t.Fatal(err)
		}
		spec := m.defaultSpec()
		spec.Mode = "STRICT"
		m.apply(t, spec)
		strict := map[string]string{"reporter": "destination", "connection_security_policy": "unknown", "response_flags": "DENY", "destination_workload": "server1"}
		before := m.metric(t, "node1", "istio_tcp_connections_failed_total", strict)
		if reaches("outside1", echoAt) {
			t.Fatal("plaintext got into a STRICT workload")
		}
		if got := m.metric(t, "node1", "istio_tcp_connections_failed_total", strict) - before; got != 1 {
			t.Errorf("plaintext refusals rose by %v, want 1", got)
		}
		opened := tcp("destination", "istio_tcp_connections_opened_total", nil)
		if !reaches("client1", echoAt) {
			t.Fatal("the enrolled client was refused in STRICT mode")
		}
		if got := tcp("destination", "istio_tcp_connections_opened_total", nil) - opened; got != 1 {
			t.Errorf("mutual_tls connections at the destination rose by %v, want 1", got)
		}
	})
}

// TestSameNodeFastPathRestart: the restart guarantee holds on the fast path
// too. A loop of new connections between two pods of node1 (connect, 1 KiB
// each way, close; 500/s) sees no refused and no reset connection while
// node1's agent is replaced (SIGTERM, successor 1 s later), and the old agent
// hands over after draining its fast-path connections.
func TestSameNodeFastPathRestart(t *testing.T) {
	t.Setenv("WARREN_SAME_NODE_FAST_PATH", "true")
	m := newMesh(t)
	m.serve(t, m.pod("server1"), "whoami", "-l", ":8080")
	const conns = 5000
	loop, err := m.pod("client1").Start(appPath, "fanout", "-c", netip.AddrPortFrom(m.pod("server1").IPv4(), 8080).String(),
		"-n", fmt.Sprint(conns), "-rate", "500", "-conns", "64", "-timeout", "30s")
	if err != nil {
		t.Fatal(err)
	}
	old := m.Agents["node1"]
	time.Sleep(2 * time.Second) // a loop in full swing, as the restart tests do
	if err := old.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	m.startAgent(t, m.lab.Node("node1"), nil)
	stopOld(t, old)
	waitLoop(t, loop, conns)
	// Both agents carried the loop, on the fast path but for the moment when
	// the successor serves the client pod and not yet the server pod (those
	// few connections take HBONE, to the old agent's HBONE server), and no
	// connection ended with a flag.
	for _, a := range []string{old.Output(), m.Agents["node1"].Output()} {
		fast := 0
		for _, l := range strings.Split(a, "\n") {
			if !strings.Contains(l, `"log":"access"`) {
				continue
			}
			if strings.Contains(l, `"response_flags"`) {
				t.Errorf("access-log record with a flag: %s", l)
			} else if strings.Contains(l, `"same_node":true`) {
				fast++
			}
		}
		if fast == 0 {
			t.Errorf("an agent logged no fast-path connection")
		}
	}
}
