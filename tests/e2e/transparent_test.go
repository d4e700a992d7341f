package e2e

import (
	"context"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/tests/lab"
)

// addrOf returns pod's address of a's family.
func addrOf(pod *lab.Pod, a netip.Addr) netip.Addr {
	if a.Unmap().Is4() {
		return pod.IPv4()
	}
	return pod.IPv6()
}

func unmapped(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// TestTransparent: with warren in the path, an enrolled client sees the
// address it dialed and its own pod address (getpeername, getsockname), and
// an app sees the real client's address (HBONE across nodes, on one node,
// plaintext from outside the mesh); bytes pass intact both ways and a
// half-close goes through (labapp probe half-closes, whoami echoes to EOF).
func TestTransparent(t *testing.T) {
	m := newMesh(t)
	for _, p := range []string{"server1", "server2", "outside"} {
		m.serve(t, m.pod(p), "whoami", "-l", ":8080")
	}
	for _, p := range []string{"server1", "server2"} {
		m.serve(t, m.pod(p), "whoami", "-l", ":9000") // the echo service's target port
	}
	client1, server1, server2, outside := m.pod("client1"), m.pod("server1"), m.pod("server2"), m.pod("outside")

	t.Run("client sees what it dialed", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			dst  netip.AddrPort
		}{
			{"pod ip v4", netip.AddrPortFrom(server2.IPv4(), 8080)},
			{"pod ip v6", netip.AddrPortFrom(server2.IPv6(), 8080)},
			{"service VIP", netip.AddrPortFrom(m.vip, 80)},
			{"outside the mesh v4", netip.AddrPortFrom(outside.IPv4(), 8080)},
			{"outside the mesh v6", netip.AddrPortFrom(outside.IPv6(), 8080)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				msg := "marker-" + strings.ReplaceAll(tc.name, " ", "-")
				r := m.probe(t, client1, tc.dst, msg)
				remote, local := unmapped(netip.MustParseAddrPort(r.Remote)), unmapped(netip.MustParseAddrPort(r.Local))
				if remote != tc.dst {
					t.Errorf("getpeername = %s, want %s", remote, tc.dst)
				}
				if want := addrOf(client1, tc.dst.Addr()); local.Addr() != want || local.Port() == 0 {
					t.Errorf("getsockname = %s, want %s and a port", local, want)
				}
				_, seen := whoami(t, r.Reply)
				if want := addrOf(client1, tc.dst.Addr()); seen.Addr().Unmap() != want {
					t.Errorf("server saw the client as %s, want %s", seen, want)
				}
				if !strings.HasSuffix(r.Reply, "\n"+msg) {
					t.Errorf("reply %q does not end with the echoed %q", r.Reply, msg)
				}
			})
		}
	})

	t.Run("server sees its real client", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			from *lab.Pod
			dst  netip.AddrPort
		}{
			{"HBONE across nodes v4", client1, netip.AddrPortFrom(server2.IPv4(), 8080)},
			{"HBONE across nodes v6", client1, netip.AddrPortFrom(server2.IPv6(), 8080)},
			{"HBONE on one node v4", client1, netip.AddrPortFrom(server1.IPv4(), 8080)},
			{"HBONE on one node v6", client1, netip.AddrPortFrom(server1.IPv6(), 8080)},
			{"plaintext from outside the mesh v4", outside, netip.AddrPortFrom(server2.IPv4(), 8080)},
			{"plaintext from outside the mesh v6", outside, netip.AddrPortFrom(server2.IPv6(), 8080)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				msg := strings.Repeat("x", 100000)
				r := m.probe(t, tc.from, tc.dst, msg)
				local, seen := whoami(t, r.Reply)
				if want := addrOf(tc.from, tc.dst.Addr()); seen.Addr().Unmap() != want {
					t.Errorf("app saw the client as %s, want %s", seen, want)
				}
				if unmapped(local) != tc.dst {
					t.Errorf("app's local address %s, want %s", local, tc.dst)
				}
				if !strings.HasSuffix(r.Reply, "\n"+msg) || len(r.Reply) != strings.Index(r.Reply, "\n")+1+len(msg) {
					t.Errorf("echo of %d bytes came back as %d bytes", len(msg), len(r.Reply))
				}
			})
		}
	})

	t.Run("source not owned by the peer's identity is refused and counted", func(t *testing.T) {
		// A peer with client1's identity (a certificate from the mesh's CA)
		// that tunnels from the outside pod, an address of no workload.
		ca, err := builtinca.LoadDir(filepath.Join(m.Dir, "ca"), false, builtinca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")})
		if err != nil {
			t.Fatal(err)
		}
		clientID, serverID := spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/client"), spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/server")
		id, err := identity.Parse(clientID.String())
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		svid, bundle, err := ca.Fetch(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		pool, err := hbone.NewPool(hbone.PoolConfig{
			TLS: hbone.SPIFFEClientTLS{SVID: func(spiffeid.ID) (x509svid.Source, error) { return svid, nil }, Bundles: bundle},
			DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
				err = outside.Do(func() error {
					c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer pool.Close()
		before := plainMetric(t, m, "node2", "warren_hbone_source_mismatch_total")
		for _, dst := range []netip.Addr{server2.IPv4(), server2.IPv6()} {
			st, err := pool.Dial(ctx, hbone.Request{Source: clientID, Expected: []spiffeid.ID{serverID},
				Addr: netip.AddrPortFrom(dst, 15008), Authority: netip.AddrPortFrom(dst, 8080)})
			if err == nil {
				st.Close()
				t.Fatalf("a tunnel from %s (no workload) with identity %s was accepted", outside.IPv4(), clientID)
			}
			if !strings.Contains(err.Error(), "401") {
				t.Errorf("refusal: %v, want 401", err)
			}
		}
		if after := plainMetric(t, m, "node2", "warren_hbone_source_mismatch_total"); after-before != 2 {
			t.Errorf("warren_hbone_source_mismatch_total %v → %v, want +2", before, after)
		}
	})

	t.Run("enroll, unenroll, re-enroll and uninstall restore the pod's routing", func(t *testing.T) {
		without := m.defaultSpec()
		without.Workloads = without.Workloads[:3] // server2 is last
		if without.Workloads[2]["name"] != "client2" {
			t.Fatalf("unexpected default spec order: %v", without.Workloads)
		}
		enrolled := routingState(t, server2)
		if !strings.Contains(enrolled, "fwmark 0x53a lookup 1338") || !strings.Contains(enrolled, "local default dev lo table 1338") {
			t.Fatalf("enrolled pod has no source-preservation routing:\n%s", enrolled)
		}
		m.apply(t, without)
		base := waitRouting(t, server2, func(s string) bool { return !strings.Contains(s, "1338") })
		m.apply(t, m.defaultSpec())
		waitRouting(t, server2, func(s string) bool { return s == enrolled })
		m.apply(t, without)
		waitRouting(t, server2, func(s string) bool { return s == base })
		m.apply(t, m.defaultSpec())
		waitRouting(t, server2, func(s string) bool { return s == enrolled })
		// A stopped agent keeps the routing (as it keeps its pins); uninstall removes it.
		node2 := server2.Node()
		if err := m.Agents["node2"].Stop(); err != nil {
			t.Logf("stop agent: %v", err)
		}
		un, err := node2.Start(m.AgentPath, "uninstall", "--pin-dir", node2.PinDir(), "--state-dir", m.StateDir(node2))
		if err != nil {
			t.Fatal(err)
		}
		if err := un.Wait(); err != nil {
			t.Fatalf("uninstall: %v\n%s", err, un.Output())
		}
		if got := routingState(t, server2); got != base {
			t.Fatalf("after uninstall:\n%s\nwant, as before enrollment:\n%s", got, base)
		}
		noFirewallRules(t, server2)
		// Nor does the listener holder keep the pod's mesh ports listening.
		out, err := exec.Command("nsenter", "--net="+server2.NetNSPath(), "ss", "-Hltn").CombinedOutput()
		if err != nil {
			t.Fatalf("ss: %v %s", err, out)
		}
		for _, port := range []string{":15001", ":15006", ":15008"} {
			if strings.Contains(string(out), port+" ") {
				t.Errorf("after uninstall server2 still listens on %s (held by the listener holder?):\n%s", port, out)
			}
		}
	})
}

// routingState is what source preservation may touch in pod's namespace:
// rules and routes of every table, both families, and tcp_fwmark_accept.
func routingState(t *testing.T, pod *lab.Pod) string {
	t.Helper()
	name := filepath.Base(pod.NetNSPath())
	var b strings.Builder
	for _, args := range [][]string{{"-4", "rule"}, {"-6", "rule"}, {"-4", "route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"}} {
		out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
		b.Write(out)
	}
	out, err := exec.Command("ip", "netns", "exec", name, "cat", "/proc/sys/net/ipv4/tcp_fwmark_accept").CombinedOutput()
	if err != nil {
		t.Fatalf("read tcp_fwmark_accept: %v: %s", err, out)
	}
	b.WriteString("tcp_fwmark_accept=" + string(out))
	return b.String()
}

// waitRouting waits until pod's routing state satisfies ok, and returns it.
func waitRouting(t *testing.T, pod *lab.Pod, ok func(string) bool) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		s := routingState(t, pod)
		if ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("routing of %s never reached the expected state; last:\n%s", pod.Name(), s)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// noFirewallRules checks that pod's namespace has no iptables or nftables rules.
func noFirewallRules(t *testing.T, pod *lab.Pod) {
	t.Helper()
	name := filepath.Base(pod.NetNSPath())
	for _, cmd := range [][]string{{"iptables-save"}, {"ip6tables-save"}, {"nft", "list", "ruleset"}} {
		if _, err := exec.LookPath(cmd[0]); err != nil {
			t.Logf("%s not installed: not checked", cmd[0])
			continue
		}
		out, err := exec.Command("ip", append([]string{"netns", "exec", name}, cmd...)...).CombinedOutput()
		if err != nil {
			t.Logf("%v: %v: %s", cmd, err, out)
			continue
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "-A ") || strings.Contains(line, " rule ") || strings.HasPrefix(strings.TrimSpace(line), "chain ") {
				t.Errorf("%v in %s: %s", cmd, pod.Name(), line)
			}
		}
	}
}

// plainMetric reads a metric without labels from node's agent.
func plainMetric(t *testing.T, m *testMesh, node, name string) float64 {
	t.Helper()
	text, err := m.Metrics(m.lab.Node(node))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("no %s in %s's metrics", name, node)
	return 0
}
