package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

func TestMeshBulkBothDirections(t *testing.T) {
	m := newMesh(t)
	server := m.pod("server2")
	m.serve(t, server, "sink", "-l", ":9000")
	const size = 1 << 30
	m.serve(t, server, "give", "-l", ":9001", "-n", fmt.Sprint(size), "-seed", "9")
	// Client to server: 1 GiB, then a half-close; the client still reads the sink's answer.
	r := m.source(t, m.pod("client1"), netip.AddrPortFrom(server.IPv4(), 9000), size)
	if r.Bytes != size {
		t.Fatalf("sent %d bytes, want %d", r.Bytes, size)
	}
	// Server to client: 1 GiB over IPv6.
	out, err := m.run(t, m.pod("client1"), "take", "-c", netip.AddrPortFrom(server.IPv6(), 9001).String(), "-n", fmt.Sprint(size), "-seed", "9", "-timeout", "300s")
	if err != nil || !strings.Contains(out, `"ok":true`) {
		t.Fatalf("take 1 GiB: %v\n%s", err, out)
	}
	t.Logf("1 GiB each way intact: %s", strings.TrimSpace(out))
}

func TestMeshWireIsEncrypted(t *testing.T) {
	m := newMesh(t)
	marker := "WARREN-PLAINTEXT-MARKER-7f3a"
	m.serve(t, m.pod("server2"), "echo", "-l", ":7000")
	m.serve(t, m.pod("server1"), "echo", "-l", ":7000")

	sniff, err := m.lab.SniffUnderlay(m.lab.Node("node1"))
	if err != nil {
		t.Fatal(err)
	}
	// Through the mesh: client1 (node1) to server2 (node2).
	msg := strings.Repeat(marker, 100)
	r := m.probe(t, m.pod("client1"), netip.AddrPortFrom(m.pod("server2").IPv4(), 7000), msg)
	frames := sniff.Stop()
	if r.Reply != msg {
		t.Fatalf("echo through the mesh returned %d bytes, want %d", len(r.Reply), len(msg))
	}
	var tls, hboneFrames int
	for _, f := range frames {
		if bytes.Contains(f, []byte(marker)) {
			t.Fatalf("the plaintext marker crossed the wire between nodes")
		}
		if port15008(f) {
			hboneFrames++
			// A TLS 1.3 application-data record header: 0x17 0x03 0x03.
			if bytes.Contains(f, []byte{0x17, 0x03, 0x03}) {
				tls++
			}
		}
	}
	if hboneFrames == 0 || tls == 0 {
		t.Fatalf("saw %d frames, %d to/from port 15008, %d with TLS records: the tunnel did not cross node1's link", len(frames), hboneFrames, tls)
	}

	// Control: plaintext from outside the mesh (PERMISSIVE) does show the marker, so the capture works.
	sniff, err = m.lab.SniffUnderlay(m.lab.Node("node1"))
	if err != nil {
		t.Fatal(err)
	}
	m.probe(t, m.pod("outside"), netip.AddrPortFrom(m.pod("server1").IPv4(), 7000), msg)
	seen := false
	for _, f := range sniff.Stop() {
		seen = seen || bytes.Contains(f, []byte(marker))
	}
	if !seen {
		t.Fatal("the capture did not see plaintext it should have: the check above proves nothing")
	}
	t.Logf("%d frames between nodes, %d carried TLS records on 15008, none the marker", len(frames), tls)
}

// port15008 reports whether an Ethernet frame carries TCP to or from port 15008.
func port15008(f []byte) bool {
	if len(f) < 14 {
		return false
	}
	var l4 []byte
	switch uint16(f[12])<<8 | uint16(f[13]) {
	case 0x0800:
		ihl := int(f[14]&0x0f) * 4
		if len(f) < 14+ihl+4 || f[14+9] != 6 {
			return false
		}
		l4 = f[14+ihl:]
	case 0x86dd:
		if len(f) < 14+40+4 || f[14+6] != 6 {
			return false
		}
		l4 = f[14+40:]
	default:
		return false
	}
	src, dst := uint16(l4[0])<<8|uint16(l4[1]), uint16(l4[2])<<8|uint16(l4[3])
	return src == 15008 || dst == 15008
}

func TestMeshAuthorization(t *testing.T) {
	m := newMesh(t)
	server := m.pod("server2")
	m.serve(t, server, "echo", "-l", ":7000")
	m.serve(t, server, "echo", "-l", ":7001")
	client := m.pod("client1")
	to := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(server.IPv4(), port) }
	reaches := func(port uint16) bool {
		out, err := m.run(t, client, "probe", "-c", to(port).String(), "-m", "hi", "-timeout", "5s")
		return err == nil && strings.Contains(out, `"reply":"hi"`)
	}
	policy := func(name, action string, match map[string]any) map[string]any {
		return map[string]any{"name": name, "namespace": "default", "scope": "Namespace", "action": action,
			"rules": [][][]map[string]any{{{match}}}}
	}
	denied := func() float64 {
		return m.metric(t, "node2", "istio_tcp_connections_failed_total", map[string]string{"reporter": "destination", "response_flags": "DENY"})
	}

	if !reaches(7000) {
		t.Fatal("no policy: the connection failed")
	}
	t.Run("deny by principal", func(t *testing.T) {
		spec := m.defaultSpec()
		spec.Policies = []map[string]any{policy("deny-client", "Deny", map[string]any{"principals": []string{"cluster.local/ns/default/sa/client"}})}
		m.apply(t, spec)
		before := denied()
		if reaches(7000) {
			t.Fatal("a denied principal got through")
		}
		if got := denied() - before; got != 1 {
			t.Errorf("DENY failures rose by %v, want 1", got)
		}
	})
	t.Run("allow list by namespace", func(t *testing.T) {
		spec := m.defaultSpec()
		spec.Policies = []map[string]any{policy("allow-prod", "Allow", map[string]any{"namespaces": []string{"prod"}})}
		m.apply(t, spec)
		if reaches(7000) {
			t.Fatal("a namespace outside the allow list got through")
		}
		spec.Policies = []map[string]any{policy("allow-default", "Allow", map[string]any{"namespaces": []string{"default"}})}
		m.apply(t, spec)
		if !reaches(7000) {
			t.Fatal("an allowed namespace was refused")
		}
	})
	t.Run("port rule", func(t *testing.T) {
		spec := m.defaultSpec()
		spec.Policies = []map[string]any{policy("only-7000", "Allow", map[string]any{"destinationPorts": []int{7000}})}
		m.apply(t, spec)
		if !reaches(7000) {
			t.Fatal("allowed port 7000 refused")
		}
		if reaches(7001) {
			t.Fatal("port 7001 outside the rule got through")
		}
	})
	t.Run("policy change resets an open idle connection", func(t *testing.T) {
		m.apply(t, m.defaultSpec())
		// An idle client: connected, sending nothing, blocked reading.
		proc, err := client.Start(appPath, "idle", "-c", to(7000).String(), "-timeout", "30s")
		if err != nil {
			t.Fatal(err)
		}
		defer proc.Stop()
		if err := proc.WaitOutput("connected", 5*time.Second); err != nil {
			t.Fatal(err)
		}
		// Wait until the destination's agent holds the connection (the
		// re-check walks the connections it holds), rather than sleeping.
		waitInbound(t, m, "node2", "server2", 1)
		select {
		case <-proc.Done():
			t.Fatalf("the connection ended before the policy change: %v %s", proc.Wait(), proc.Output())
		default:
		}
		spec := m.defaultSpec()
		spec.Policies = []map[string]any{policy("deny-client", "Deny", map[string]any{"principals": []string{"cluster.local/ns/default/sa/client"}})}
		m.apply(t, spec)
		select {
		case <-proc.Done():
			if err := proc.Wait(); err != nil || !strings.Contains(proc.Output(), `"ended":"reset"`) {
				t.Fatalf("the idle client's connection should have been reset: %v %s", err, proc.Output())
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the idle connection survived a policy that denies it")
		}
	})
}

func TestMeshPeerAuthenticationAndPassthrough(t *testing.T) {
	m := newMesh(t)
	server := m.pod("server1") // node1, enrolled
	m.serve(t, server, "echo", "-l", ":7000")
	outside := m.pod("outside")
	m.serve(t, outside, "echo", "-l", ":7000")
	reaches := func(from *lab.Pod, to netip.AddrPort) bool {
		out, err := m.run(t, from, "probe", "-c", to.String(), "-m", "hi", "-timeout", "5s")
		return err == nil && strings.Contains(out, `"reply":"hi"`)
	}
	plaintext := func() float64 {
		return m.metric(t, "node1", "istio_tcp_connections_opened_total", map[string]string{"reporter": "destination", "connection_security_policy": "unknown"})
	}
	t.Run("PERMISSIVE lets plaintext in", func(t *testing.T) {
		before := plaintext()
		if !reaches(outside, netip.AddrPortFrom(server.IPv4(), 7000)) {
			t.Fatal("plaintext from outside the mesh refused in PERMISSIVE mode")
		}
		if got := plaintext() - before; got != 1 {
			t.Errorf("plaintext connections counted: %v, want 1", got)
		}
	})
	t.Run("destination outside the mesh gets passthrough", func(t *testing.T) {
		if !reaches(m.pod("client1"), netip.AddrPortFrom(outside.IPv4(), 7000)) {
			t.Fatal("a mesh pod could not reach a pod outside the mesh")
		}
		got := m.metric(t, "node1", "istio_tcp_connections_opened_total", map[string]string{"reporter": "source", "connection_security_policy": "unknown"})
		if got < 1 {
			t.Errorf("passthrough not counted")
		}
	})
	t.Run("STRICT refuses plaintext", func(t *testing.T) {
		spec := m.defaultSpec()
		spec.Mode = "STRICT"
		m.apply(t, spec)
		if reaches(outside, netip.AddrPortFrom(server.IPv4(), 7000)) {
			t.Fatal("plaintext got into a STRICT workload")
		}
		// Mesh traffic still flows.
		if !reaches(m.pod("client2"), netip.AddrPortFrom(server.IPv4(), 7000)) {
			t.Fatal("mesh traffic refused in STRICT mode")
		}
	})
}

func TestMeshCanarySplit(t *testing.T) {
	m := newMesh(t)
	// Three more endpoints for a "canary" service: 90/5/5, and one unhealthy.
	n1, n2 := m.lab.Node("node1"), m.lab.Node("node2")
	for _, spec := range []struct {
		node *lab.Node
		name string
	}{{n1, "stable"}, {n2, "canarya"}, {n2, "canaryb"}, {n1, "sick"}} {
		p, err := spec.node.AddPod(spec.name)
		if err != nil {
			t.Fatal(err)
		}
		m.Pods[spec.name] = p
		m.serve(t, p, "whoami", "-l", ":8080")
	}
	spec := m.defaultSpec()
	svc := func(capacity int, status string) map[string]any {
		w := map[string]any{"capacity": capacity, "services": map[string]any{"default/canary.default.svc.cluster.local": map[string]int{"80": 8080}}}
		if status != "" {
			w["status"] = status
		}
		return w
	}
	spec.Workloads = append(spec.Workloads,
		m.workload("stable", "server", svc(90, "")),
		m.workload("canarya", "server", svc(5, "")),
		m.workload("canaryb", "server", svc(5, "")),
		m.workload("sick", "server", svc(90, "Unhealthy")))
	vip := netip.MustParseAddr("198.18.200.20")
	spec.Services = append(spec.Services, map[string]any{
		"name": "canary", "namespace": "default", "hostname": "canary.default.svc.cluster.local",
		"vips": []string{"/" + vip.String()}, "ports": map[string]int{"80": 8080},
	})
	m.apply(t, spec)
	for _, n := range []*lab.Node{n1, n2} {
		m.waitReady(t, n, m.Agents[n.Name()], n.IPv4().String()+":15021")
	}
	const total = 3000
	out, err := m.run(t, m.pod("client1"), "fanout", "-c", netip.AddrPortFrom(vip, 80).String(), "-n", fmt.Sprint(total), "-conns", "16", "-timeout", "120s")
	if err != nil {
		t.Fatalf("fanout: %v\n%s", err, out)
	}
	var res struct {
		Servers map[string]int
		Failed  int
		Errors  []string
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("fanout output %q: %v", out, err)
	}
	if res.Failed != 0 {
		t.Fatalf("%d of %d connections failed: %v", res.Failed, total, res.Errors)
	}
	share := func(pod string) float64 {
		return 100 * float64(res.Servers[netip.AddrPortFrom(m.pod(pod).IPv4(), 8080).String()]) / total
	}
	for pod, want := range map[string]float64{"stable": 90, "canarya": 5, "canaryb": 5} {
		if got := share(pod); got < want-3 || got > want+3 {
			t.Errorf("%s got %.1f%% of connections, want %.0f±3", pod, got, want)
		}
	}
	if got := share("sick"); got != 0 {
		t.Errorf("the unhealthy endpoint got %.1f%% of connections", got)
	}
	t.Logf("shares: stable %.1f%%, canarya %.1f%%, canaryb %.1f%%, sick %.1f%%", share("stable"), share("canarya"), share("canaryb"), share("sick"))
}

func TestAgentRestartLosesNoConnection(t *testing.T) {
	m := newMesh(t)
	m.serve(t, m.pod("server2"), "whoami", "-l", ":8080")
	n1 := m.lab.Node("node1")
	old := m.Agents["node1"]
	// New connections at 200/s for 6 s from node1's client across the restart.
	loop, err := m.pod("client1").Start(appPath, "fanout", "-c", netip.AddrPortFrom(m.pod("server2").IPv4(), 8080).String(),
		"-n", "1200", "-rate", "200", "-conns", "8", "-timeout", "30s")
	if err != nil {
		t.Fatal(err)
	}
	// An established connection, 1 KiB request/response 10 times a second
	// for 3 s: it must drain on the old agent and finish.
	m.serve(t, m.pod("server2"), "echo", "-l", ":7000")
	established, err := m.pod("client1").Start(appPath, "rr", "-c", netip.AddrPortFrom(m.pod("server2").IPv4(), 7000).String(),
		"-n", "30", "-rate", "10", "-timeout", "20s")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	// The new agent binds beside the old one (SO_REUSEPORT) on other admin ports, then the old one stops.
	m.startAgent(t, n1, []string{"--metrics-addr", ":15120", "--ready-addr", ":15121", "--admin-addr", "127.0.0.1:15100"})
	if err := old.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-old.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("the old agent did not stop on SIGTERM")
	}
	if err := loop.Wait(); err != nil {
		t.Fatalf("connection loop: %v", err)
	}
	if err := established.Wait(); err != nil {
		t.Fatalf("an established connection did not survive the restart: %v", err)
	}
	var res struct {
		Servers map[string]int
		Failed  int
		Errors  []string
	}
	if err := json.Unmarshal([]byte(loop.Output()), &res); err != nil {
		t.Fatalf("fanout output %q: %v", loop.Output(), err)
	}
	if res.Failed != 0 {
		t.Fatalf("%d of 1200 new connections failed across the restart: %v\nold agent:\n%s", res.Failed, res.Errors, old.Output())
	}
	t.Logf("1200 connections across an agent restart, none failed; the established one drained")
}

func TestMeshBadConfigKeepsServing(t *testing.T) {
	m := newMesh(t)
	m.serve(t, m.pod("server2"), "echo", "-l", ":7000")
	n1 := m.lab.Node("node1")
	good := m.status(t, n1)
	cases := []struct {
		name, yaml, want string
	}{
		{"malformed", "workloads: [\n", "yaml"},
		{"unknown field", "workloads:\n- uid: x\n  name: x\n  namespace: default\n  servicAccount: x\n", "servicAccount"},
		{"duplicate IPs", dupIPs(m), "198.19.1.11"},
		{"missing netns", missingNetns(m), "/run/netns/does-not-exist"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m.writeRaw(t, []byte(tc.yaml))
			deadline := time.Now().Add(10 * time.Second)
			var st mesh.ProviderStatus
			for time.Now().Before(deadline) {
				if st = m.status(t, n1); st.LastError != "" && strings.Contains(st.LastError, tc.want) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if !strings.Contains(st.LastError, tc.want) {
				t.Fatalf("rejection error %q does not name %q", st.LastError, tc.want)
			}
			if st.SHA256 != good.SHA256 {
				t.Fatalf("the rejected file replaced the configuration in force")
			}
			r := m.probe(t, m.pod("client1"), netip.AddrPortFrom(m.pod("server2").IPv4(), 7000), "still")
			if r.Reply != "still" {
				t.Fatalf("traffic disturbed by a rejected file: %+v", r)
			}
		})
	}
}

func dupIPs(m *testMesh) string {
	ip := m.pod("client1").IPv4()
	return fmt.Sprintf(`workloads:
- {uid: a, name: a, namespace: default, workloadIps: ["%s"], node: elsewhere}
- {uid: b, name: b, namespace: default, workloadIps: ["%s"], node: elsewhere}
`, ip, ip)
}

// missingNetns is the configuration in force plus a node1 workload whose
// network namespace does not exist: node1 must refuse it, node2 (for which
// the workload is remote) may apply it, and traffic must not notice.
func missingNetns(m *testMesh) string {
	var doc map[string]any
	if err := yaml.Unmarshal(m.Applied, &doc); err != nil {
		panic(err)
	}
	doc["workloads"] = append(doc["workloads"].([]any), map[string]any{
		"uid": "lab//v1/Pod/default/ghost", "name": "ghost", "namespace": "default", "serviceAccount": "ghost",
		"workloadIps": []string{"198.19.1.99"}, "protocol": "HBONE", "node": "node1", "netnsPath": "/run/netns/does-not-exist"})
	b, err := yaml.Marshal(doc)
	if err != nil {
		panic(err)
	}
	return string(b)
}

func TestMeshServiceWithoutEndpoint(t *testing.T) {
	m := newMesh(t)
	spec := m.defaultSpec()
	// A service whose only endpoint is unhealthy.
	spec.Workloads[3]["status"] = "Unhealthy"
	spec.Workloads[1]["status"] = "Unhealthy"
	m.apply(t, spec)
	start := time.Now()
	out, err := m.run(t, m.pod("client1"), "probe", "-c", netip.AddrPortFrom(m.vip, 80).String(), "-m", "hi", "-timeout", "10s")
	if err == nil {
		t.Fatalf("a service without a healthy endpoint answered: %s", out)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("the client learned of the missing endpoint after %s, want at once", d)
	}
	if got := m.metric(t, "node1", "istio_tcp_connections_failed_total", map[string]string{"reporter": "source", "response_flags": "UH", "destination_service": "echo.default.svc.cluster.local"}); got != 1 {
		t.Errorf("no-healthy-endpoint failures counted: %v, want 1", got)
	}
}

func TestWorkloadRemovalAndInspect(t *testing.T) {
	m := newMesh(t)
	n1 := m.lab.Node("node1")
	m.serve(t, m.pod("outside"), "echo", "-l", ":7000")
	to := netip.AddrPortFrom(m.pod("outside").IPv4(), 7000)

	// inspect reads the admin API from inside the node, as an operator would on a host.
	proc, err := n1.Start(agentPath, "inspect", "workloads")
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.Wait(); err != nil {
		t.Fatalf("inspect workloads: %v", err)
	}
	for _, want := range []string{"client1", "server1", "spiffe://cluster.local/ns/default/sa/client", "enrolled (netns cookie"} {
		if !strings.Contains(proc.Output(), want) {
			t.Errorf("inspect workloads lacks %q:\n%s", want, proc.Output())
		}
	}
	// The log level changes at run time.
	code, body, err := mesh.NodePost(n1, "http://127.0.0.1:15000/logging?level=debug")
	if err != nil || code != 200 || !strings.Contains(body, "level=DEBUG") {
		t.Errorf("POST /logging: %d %q %v", code, body, err)
	}

	// Captured or not, getpeername answers what the app dialed: the
	// agent's source-reporter count tells.
	outbound := func() float64 {
		return m.metric(t, "node1", "istio_tcp_connections_opened_total", map[string]string{"reporter": "source", "source_workload": "client1"})
	}
	before := outbound()
	if r := m.probe(t, m.pod("client1"), to, "in"); r.Remote != to.String() || outbound() != before+1 {
		t.Fatalf("client1 is not captured while enrolled: peer %s, outbound connections %v → %v", r.Remote, before, outbound())
	}
	// Remove client1 from the configuration: its listeners close and capture stops.
	spec := m.defaultSpec()
	spec.Workloads = spec.Workloads[1:]
	m.apply(t, spec)
	before = outbound()
	if r := m.probe(t, m.pod("client1"), to, "out"); r.Remote != to.String() || outbound() != before {
		t.Fatalf("client1 still captured after its removal: peer %s, outbound connections %v → %v", r.Remote, before, outbound())
	}
	body2, err := m.Admin(n1, "/bpf")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(body2), "Captured") {
		t.Errorf("/bpf lacks the counters: %s", body2)
	}
	ws, err := m.Admin(n1, "/workloads")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(ws), "client1") {
		t.Errorf("/workloads still lists client1: %s", ws)
	}
}

// waitInbound waits until node's agent counts at least n open inbound
// connections to the workload.
func waitInbound(t *testing.T, m *testMesh, node, workload string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		body, err := m.Admin(m.lab.Node(node), "/workloads")
		if err == nil {
			var ws []struct {
				Name string
				Open int `json:"openInboundConnections"`
			}
			if json.Unmarshal(body, &ws) == nil {
				for _, w := range ws {
					if w.Name == workload && w.Open >= n {
						return
					}
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's agent does not hold %d inbound connection(s) to %s after 10 s: %s %v", node, n, workload, body, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
