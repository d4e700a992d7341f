// Command demo is warren's demo (make demo): a two-node virtual cluster on
// this host with a client and a server workload on each node and a pod
// outside the mesh, one node agent per node (local-file provider, built-in
// CA), traffic through the mesh, and a short report of what happened: the
// connections captured, the identities at both ends, proof that the bytes
// between nodes were encrypted, a policy denial, a metrics excerpt and what
// bpftool shows. Everything is removed at the end.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/warren-mesh/warren/pkg/loader"
	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func section(title string) { fmt.Printf("\n== %s\n", title) }

func run() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: run make demo (it uses sudo when you are not root)")
	}
	start := time.Now()
	dir, err := os.MkdirTemp("", "warren-demo")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	fmt.Println("building labapp and nodeagent ...")
	app, err := lab.BuildApp(dir)
	if err != nil {
		return err
	}
	agent, err := lab.BuildCommand(dir, mesh.AgentPackage)
	if err != nil {
		return err
	}
	l, err := lab.New(lab.Config{})
	if err != nil {
		return err
	}
	defer func() {
		if err := l.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "demo: clean up lab:", err)
		}
		fmt.Printf("\nlab %s removed (namespaces, cgroups, pins, processes); demo took %s\n", l.Prefix(), time.Since(start).Round(100*time.Millisecond))
	}()
	c, err := mesh.NewCluster(l, app)
	if err != nil {
		return err
	}
	m, err := mesh.New(c, agent, dir)
	if err != nil {
		return err
	}
	defer m.Stop()
	n1, n2 := l.Node("node1"), l.Node("node2")

	section("cluster")
	for _, n := range l.Nodes() {
		fmt.Printf("%s  underlay %s  pods %s, %s  agent pid %d\n", n.Name(), n.IPv4(), n.PodCIDRv4(), n.PodCIDRv6(), m.Agents[n.Name()].PID())
		for _, p := range n.Pods() {
			role := "in the mesh (HBONE)"
			if p.Name() == "outside" {
				role = "outside the mesh"
			}
			fmt.Printf("  %-8s %-15s %-22s %s\n", p.Name(), p.IPv4(), p.IPv6(), role)
		}
	}

	section("identities (built-in CA, one X.509-SVID per service account on each node)")
	for _, n := range l.Nodes() {
		body, err := m.Admin(n, "/certs")
		if err != nil {
			return err
		}
		var certs []map[string]any
		json.Unmarshal(body, &certs)
		for _, ci := range certs {
			fmt.Printf("%s  %v  serial %v  expires %v\n", n.Name(), ci["identity"], short(fmt.Sprint(ci["serial"])), ci["notAfter"])
		}
	}

	for _, s := range []string{"server1", "server2"} {
		if _, err := c.Serve(c.Pod(s), "sink", "-l", ":9000"); err != nil {
			return err
		}
		if _, err := c.Serve(c.Pod(s), "echo", "-l", ":7000"); err != nil {
			return err
		}
	}

	section("traffic (sha256 checked by the receiving app)")
	flows := []struct {
		from, what string
		to         netip.AddrPort
	}{
		{"client1", "across nodes, HBONE", netip.AddrPortFrom(c.Pod("server2").IPv4(), 9000)},
		{"client1", "across nodes, HBONE, IPv6", netip.AddrPortFrom(c.Pod("server2").IPv6(), 9000)},
		{"client1", "same node, HBONE", netip.AddrPortFrom(c.Pod("server1").IPv4(), 9000)},
		{"client2", "service VIP echo:80", netip.AddrPortFrom(mesh.EchoVIP, 80)},
		{"outside", "plaintext into the mesh (PERMISSIVE)", netip.AddrPortFrom(c.Pod("server1").IPv4(), 9000)},
	}
	for _, f := range flows {
		r, err := c.Source(c.Pod(f.from), f.to, 64<<20)
		if err != nil {
			return err
		}
		fmt.Printf("%-8s -> %-26s %-38s 64 MiB intact  %5.0f Mbit/s\n", f.from, f.to, f.what, float64(r.Bytes)*8/r.Seconds/1e6)
	}

	section("on the wire between the nodes (AF_PACKET capture on node1's underlay link)")
	marker := "WARREN-DEMO-PLAINTEXT-MARKER"
	msg := strings.Repeat(marker, 200)
	for _, f := range []struct {
		from, label string
		to          netip.AddrPort
	}{
		{"client1", "client1 -> server2 through the mesh", netip.AddrPortFrom(c.Pod("server2").IPv4(), 7000)},
		{"outside", "outside -> server1 in plaintext    ", netip.AddrPortFrom(c.Pod("server1").IPv4(), 7000)},
	} {
		sniff, err := l.SniffUnderlay(n1)
		if err != nil {
			return err
		}
		if _, err := c.Probe(c.Pod(f.from), f.to, msg); err != nil {
			return err
		}
		frames := sniff.Stop()
		var markers, tlsFrames int
		for _, fr := range frames {
			if bytes.Contains(fr, []byte(marker)) {
				markers++
			}
			if bytes.Contains(fr, []byte{0x17, 0x03, 0x03}) {
				tlsFrames++
			}
		}
		fmt.Printf("%s: %3d frames, %3d with TLS application records, %3d with the app's plaintext marker\n", f.label, len(frames), tlsFrames, markers)
	}

	section("authorization: DENY client2's principal at the servers")
	spec := m.DefaultSpec()
	spec.Policies = []map[string]any{{
		"name": "deny-client2", "namespace": "default", "scope": "Namespace", "action": "Deny",
		"rules": [][][]map[string]any{{{{"principals": []string{"cluster.local/ns/default/sa/client"}, "sourceIps": []string{c.Pod("client2").IPv4().String() + "/32", c.Pod("client2").IPv6().String() + "/128"}}}}},
	}}
	if err := m.Apply(spec); err != nil {
		return err
	}
	_, err = c.Probe(c.Pod("client2"), netip.AddrPortFrom(c.Pod("server1").IPv4(), 7000), "let me in")
	fmt.Printf("client2 -> server1:7000  refused=%v\n", err != nil)
	r, err := c.Probe(c.Pod("client1"), netip.AddrPortFrom(c.Pod("server1").IPv4(), 7000), "hello")
	fmt.Printf("client1 -> server1:7000  answered %q (err %v)\n", r.Reply, err)
	for _, line := range strings.Split(m.Agents["node1"].Output(), "\n") {
		if strings.Contains(line, `"response_flags":"DENY"`) {
			fmt.Printf("access log on node1: %s\n", line)
			break
		}
	}

	section("captured connections (BPF counters of each agent)")
	for _, n := range []*lab.Node{n1, n2} {
		body, err := m.Admin(n, "/bpf")
		if err != nil {
			return err
		}
		var b struct {
			Stats  loader.Stats
			Errors uint64
		}
		json.Unmarshal(body, &b)
		fmt.Printf("%s: captured %d outbound, %d inbound plaintext; passed %d marked (the agent's own); errors %d\n",
			n.Name(), b.Stats.Captured, b.Stats.InboundCaptured, b.Stats.PassedMark, b.Errors)
	}

	section("metrics excerpt (node1 :15020/metrics)")
	text, err := m.Metrics(n1)
	if err != nil {
		return err
	}
	shown := 0
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "istio_tcp_connections_opened_total{") || strings.HasPrefix(line, "istio_tcp_connections_failed_total{") {
			fmt.Println(line)
			if shown++; shown == 6 {
				break
			}
		}
	}

	section("bpftool")
	bpftool(n1, "cgroup", "tree", n1.CgroupRoot())
	bpftool(n1, "map", "dump", "pinned", n1.PinDir()+"/wr_pods")
	fmt.Println("\nmake test runs the same checks as assertions; see README.md for the commands on a real node.")
	return nil
}

// bpftool prints what bpftool shows, or why it could not run.
func bpftool(n *lab.Node, args ...string) {
	fmt.Printf("$ bpftool %s\n", strings.Join(args, " "))
	out, err := exec.Command("bpftool", args...).CombinedOutput()
	if err != nil {
		fmt.Printf("(bpftool: %v; make deps installs it)\n", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) > 14 {
		lines = append(lines[:14], fmt.Sprintf("... %d more lines", len(lines)-14))
	}
	fmt.Println(strings.Join(lines, "\n"))
}

func short(s string) string {
	if len(s) > 16 {
		return s[:16] + "…"
	}
	return s
}
