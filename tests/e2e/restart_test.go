package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

// The restart guarantees (README "Restarts, upgrades and crashes"): a loop
// of new connections across nodes — connect, 1 KiB each way, close — at
// 500/s sees no refused and no reset connection while an agent is replaced.

// connLoop is labapp fanout's report.
type connLoop struct {
	Servers map[string]int
	Failed  int
	Refused int
	Reset   int
	Errors  []string
	P50ms   float64
	P99ms   float64
	Maxms   float64
	Seconds float64
}

// startLoop starts n connects at 500/s from client1 to server2's whoami.
func startLoop(t *testing.T, m *testMesh, n int) *lab.Process {
	t.Helper()
	loop, err := m.pod("client1").Start(appPath, "fanout", "-c", netip.AddrPortFrom(m.pod("server2").IPv4(), 8080).String(),
		"-n", fmt.Sprint(n), "-rate", "500", "-conns", "64", "-timeout", "30s")
	if err != nil {
		t.Fatal(err)
	}
	return loop
}

// loopResult waits for the loop and logs its report.
func loopResult(t *testing.T, loop *lab.Process, n int) connLoop {
	t.Helper()
	select {
	case <-loop.Done():
	case <-time.After(120 * time.Second):
		t.Fatal("connection loop did not finish in 120 s")
	}
	if err := loop.Wait(); err != nil {
		t.Fatalf("connection loop: %v\n%s", err, loop.Output())
	}
	var res connLoop
	if err := json.Unmarshal([]byte(loop.Output()), &res); err != nil {
		t.Fatalf("fanout output %q: %v", loop.Output(), err)
	}
	t.Logf("%d connections in %.1f s: failed %d (refused %d, reset %d), latency p50 %.2f ms p99 %.2f ms max %.0f ms",
		n, res.Seconds, res.Failed, res.Refused, res.Reset, res.P50ms, res.P99ms, res.Maxms)
	return res
}

// waitLoop waits for the loop and requires that no connection failed.
func waitLoop(t *testing.T, loop *lab.Process, n int) connLoop {
	t.Helper()
	res := loopResult(t, loop, n)
	if res.Failed != 0 {
		t.Errorf("%d of %d connections failed (refused %d, reset %d): %v", res.Failed, n, res.Refused, res.Reset, res.Errors)
	}
	return res
}

// stopOld sends SIGTERM to an agent and waits for it to exit.
func stopOld(t *testing.T, old *lab.Process) {
	t.Helper()
	if err := old.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-old.Done():
	case <-time.After(60 * time.Second):
		t.Fatalf("agent %d did not stop within 60 s of SIGTERM", old.PID())
	}
	if !strings.Contains(old.Output(), "handed over to agent pid") {
		t.Errorf("agent %d stopped without handing over:\n%s", old.PID(), tail(old.Output(), 20))
	}
}

func tail(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}

// 1. SIGTERM, then a successor with the same flags 1 s later (a rolling
// update with maxUnavailable: 1): the old agent keeps accepting until the
// successor serves every pod. On the destination node, then on the source.
func TestRestartSIGTERMThenSuccessor(t *testing.T) {
	m := newMesh(t)
	m.serve(t, m.pod("server2"), "whoami", "-l", ":8080")
	for _, node := range []string{"node2", "node1"} {
		t.Run(node, func(t *testing.T) {
			n := m.lab.Node(node)
			old := m.Agents[node]
			const conns = 5000
			loop := startLoop(t, m, conns)
			time.Sleep(2 * time.Second)
			if err := old.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Second)
			select {
			case <-old.Done():
				t.Fatalf("the old agent exited before a successor came:\n%s", tail(old.Output(), 20))
			default:
			}
			m.startAgent(t, n, nil) // the same flags and ports
			stopOld(t, old)
			waitLoop(t, loop, conns)
		})
	}
}

// 2. The chart's order (maxSurge): the successor first, with the same
// flags, then SIGTERM. A long-lived connection through the old agent keeps
// working while it drains and is reset at --drain-timeout (5 s in the lab):
// established connections do not move between processes.
func TestRestartSuccessorFirst(t *testing.T) {
	m := newMesh(t)
	m.serve(t, m.pod("server2"), "whoami", "-l", ":8080")
	m.serve(t, m.pod("server2"), "echo", "-l", ":7000")
	n := m.lab.Node("node2")
	old := m.Agents["node2"]
	echo := netip.AddrPortFrom(m.pod("server2").IPv4(), 7000).String()
	// Requests every 100 ms for 30 s, and an idle connection.
	long, err := m.pod("client1").Start(appPath, "rr", "-c", echo, "-n", "300", "-rate", "10", "-timeout", "60s")
	if err != nil {
		t.Fatal(err)
	}
	idle, err := m.pod("client1").Start(appPath, "idle", "-c", echo, "-timeout", "60s")
	if err != nil {
		t.Fatal(err)
	}
	const conns = 5000
	loop := startLoop(t, m, conns)
	time.Sleep(2 * time.Second)
	m.startAgent(t, n, nil)
	time.Sleep(time.Second)
	sigterm := time.Now()
	stopOld(t, old)
	waitLoop(t, loop, conns)
	// The idle connection was proxied by the old agent: it lives through the
	// drain and is reset when the old agent's --drain-timeout ends.
	select {
	case <-idle.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the idle connection outlived the old agent's drain")
	}
	ended := time.Since(sigterm)
	if !strings.Contains(idle.Output(), `"ended":"reset"`) {
		t.Errorf("idle connection through the old agent ended with %q, want a reset at the drain deadline", idle.Output())
	}
	if ended < 4*time.Second {
		t.Errorf("the idle connection ended %v after SIGTERM, before the 5 s drain", ended)
	}
	t.Logf("idle connection through the old agent: %s, %v after SIGTERM (--drain-timeout 5s)", strings.TrimSpace(idle.Output()), ended.Round(100*time.Millisecond))
	if err := long.Wait(); err == nil || !strings.Contains(long.Output(), "reset") {
		t.Errorf("a 30 s request/response connection through the old agent should be reset at its 5 s drain deadline: %v %s", err, long.Output())
	}
}

// 4. Ten restarts in a row on the destination node, alternating both
// orders, under the loop; then nothing leaked: one agent's listeners in
// each pod, its pins only, no stale hand-over socket, and the last agent's
// goroutines and descriptors as the first agent's.
func TestRestartTenInARow(t *testing.T) {
	m := newMesh(t)
	m.serve(t, m.pod("server2"), "whoami", "-l", ":8080")
	n := m.lab.Node("node2")
	before := snapshotNode(t, m, n)
	const conns = 10000
	loop := startLoop(t, m, conns)
	for i := range 10 {
		old := m.Agents["node2"]
		if i%2 == 0 {
			if err := old.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond)
			m.startAgent(t, n, nil)
		} else {
			m.startAgent(t, n, nil)
		}
		stopOld(t, old)
	}
	waitLoop(t, loop, conns)
	time.Sleep(time.Second) // the loop's last connections close
	after := snapshotNode(t, m, n)
	if strings.Join(after.pins, ",") != strings.Join(before.pins, ",") {
		t.Errorf("pins changed: before %v, after %v", before.pins, after.pins)
	}
	if strings.Join(after.listeners, ",") != strings.Join(before.listeners, ",") {
		t.Errorf("listeners in server2 changed: before %v, after %v", before.listeners, after.listeners)
	}
	if len(after.sockets) != 1 {
		t.Errorf("hand-over sockets left in the state dir: %v", after.sockets)
	}
	// Like with like: the first agent is measured before any traffic, the
	// last after it, when it may still hold the HBONE connections node1's
	// pool spread the loop over (up to --hbone-conns-per-peer, until their
	// idle timeout). Those are not leaks: each connection's descriptor and
	// goroutines are left out on both sides.
	if after.baseFDs() > before.baseFDs()+4 || after.baseGoroutines() > before.baseGoroutines()+10 {
		t.Errorf("after 10 restarts the agent has %d fds and %d goroutines besides its HBONE connections; the first had %d and %d",
			after.baseFDs(), after.baseGoroutines(), before.baseFDs(), before.baseGoroutines())
	}
	t.Logf("first agent: %d fds, %d goroutines (%d HBONE connections with %d goroutines); after 10 restarts: %d fds, %d goroutines (%d HBONE connections with %d goroutines)",
		before.fds, before.goroutines, before.hboneConns, before.hboneGoroutines, after.fds, after.goroutines, after.hboneConns, after.hboneGoroutines)
}

type nodeSnapshot struct {
	pins, listeners, sockets []string
	fds, goroutines          int
	// hboneConns counts the established inbound HBONE connections in the
	// node's pods, hboneGoroutines the agent's goroutines serving HBONE
	// connections (their stacks in pkg/hbone's connection code).
	hboneConns, hboneGoroutines int
}

// baseFDs is the agent's descriptor count without one per HBONE connection.
func (s nodeSnapshot) baseFDs() int { return s.fds - s.hboneConns }

// baseGoroutines is the agent's goroutine count without those of its HBONE
// connections.
func (s nodeSnapshot) baseGoroutines() int { return s.goroutines - s.hboneGoroutines }

func snapshotNode(t *testing.T, m *testMesh, n *lab.Node) nodeSnapshot {
	t.Helper()
	var s nodeSnapshot
	filepath.Walk(n.PinDir(), func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			s.pins = append(s.pins, strings.TrimPrefix(p, n.PinDir()))
		}
		return nil
	})
	out, err := exec.Command("nsenter", "--net="+m.pod("server2").NetNSPath(), "ss", "-Hltn").CombinedOutput()
	if err != nil {
		t.Fatalf("ss in server2: %v %s", err, out)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(l); len(f) >= 4 {
			s.listeners = append(s.listeners, f[3])
		}
	}
	sort.Strings(s.listeners)
	s.sockets, _ = filepath.Glob(filepath.Join(m.StateDir(n), "agent-*.sock"))
	pid := m.Agents[n.Name()].PID()
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	s.fds = len(fds)
	body, err := m.Admin(n, "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	fmt.Sscanf(string(body), "goroutine profile: total %d", &s.goroutines)
	s.hboneGoroutines = hboneGoroutines(string(body))
	for _, p := range n.Pods() {
		out, err := exec.Command("nsenter", "--net="+p.NetNSPath(), "ss", "-Htn", "state", "established", "( sport = :15008 )").CombinedOutput()
		if err != nil {
			t.Fatalf("ss in %s: %v %s", p.Name(), err, out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.TrimSpace(l) != "" {
				s.hboneConns++
			}
		}
	}
	return s
}

// hboneGoroutines sums the goroutines of a debug=1 goroutine profile whose
// stacks run an HBONE connection (its serving goroutine, read and write
// loops).
func hboneGoroutines(profile string) int {
	total := 0
	for _, block := range strings.Split(profile, "\n\n") {
		if !strings.Contains(block, "/pkg/hbone.(*conn).") && !strings.Contains(block, "/pkg/hbone.(*Server).ServeConn") {
			continue
		}
		var n int
		if _, err := fmt.Sscanf(block, "%d @", &n); err == nil {
			total += n
		}
	}
	return total
}

// 3. kill -9, and a successor 2 s later: the listening sockets outlive the
// agent in the node's listener holder (nodeagent fdstore), so connects made
// in the gap complete into the accept queue and are served late by the
// successor instead of being refused. Connections the killed agent was
// proxying at that instant die with it (the kernel resets them).
func TestRestartKill9(t *testing.T) {
	m := newMesh(t)
	m.serve(t, m.pod("server2"), "whoami", "-l", ":8080")
	for _, node := range []string{"node2", "node1"} {
		t.Run(node, func(t *testing.T) {
			n := m.lab.Node(node)
			old := m.Agents[node]
			const conns = 5000
			loop := startLoop(t, m, conns)
			time.Sleep(2 * time.Second)
			if err := old.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			<-old.Done()
			killed := time.Now()
			time.Sleep(2 * time.Second)
			m.startAgent(t, n, nil)
			t.Logf("successor ready %v after kill -9", time.Since(killed).Round(10*time.Millisecond))
			res := waitLoopAllowInFlight(t, loop, conns)
			if res.Maxms < 1500 {
				t.Errorf("slowest connect took %.0f ms: no connect waited through the 2 s gap, so the gap was not exercised", res.Maxms)
			}
			t.Logf("added connect delay across kill -9 + 2 s: max %.0f ms (p99 %.1f ms)", res.Maxms, res.P99ms)
		})
	}
	// The killed agents' hand-over sockets were removed by their successors.
	for _, node := range []string{"node1", "node2"} {
		if socks, _ := filepath.Glob(filepath.Join(m.StateDir(m.lab.Node(node)), "agent-*.sock")); len(socks) != 1 {
			t.Errorf("%s: hand-over sockets %v, want only the running agent's", node, socks)
		}
	}
}

// waitLoopAllowInFlight is waitLoop for a kill: nothing refused; resets only
// for connections the killed agent was proxying (at most the loop's 64
// concurrent connections), each reported.
func waitLoopAllowInFlight(t *testing.T, loop *lab.Process, n int) connLoop {
	t.Helper()
	res := loopResult(t, loop, n)
	if res.Refused != 0 {
		t.Errorf("%d connects refused across kill -9: %v", res.Refused, res.Errors)
	}
	if res.Failed != res.Reset || res.Reset > 64 {
		t.Errorf("%d failed, %d of them reset (in flight at the kill: at most 64): %v", res.Failed, res.Reset, res.Errors)
	}
	return res
}

// Without a successor (a node drain, helm uninstall), SIGTERM keeps the
// agent ready and accepting for --handover-timeout, then readiness turns 503
// and says why while open connections drain.
func TestRestartNoSuccessorReadiness(t *testing.T) {
	m := newMesh(t)
	m.serve(t, m.pod("server2"), "echo", "-l", ":7000")
	n := m.lab.Node("node2")
	first := m.Agents["node2"]
	agent := m.startAgent(t, n, []string{"--handover-timeout", "2s"})
	stopOld(t, first)
	idle, err := m.pod("client1").Start(appPath, "idle", "-c", netip.AddrPortFrom(m.pod("server2").IPv4(), 7000).String(), "-timeout", "60s")
	if err != nil {
		t.Fatal(err)
	}
	if err := idle.WaitOutput("connected", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	ready := func() (int, string) {
		code, body, err := mesh.NodeGet(n, "http://"+n.IPv4().String()+":15021/healthz/ready")
		if err != nil {
			return 0, err.Error()
		}
		return code, body
	}
	if err := agent.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	sigterm := time.Now()
	if code, body := ready(); code != 200 {
		t.Errorf("right after SIGTERM, still accepting: readiness %d %q, want 200", code, body)
	}
	for {
		code, body := ready()
		if code == 503 {
			if !strings.Contains(body, "stopped accepting new connections: no successor within --handover-timeout 2s") {
				t.Errorf("readiness 503 says %q", body)
			}
			if d := time.Since(sigterm); d < 1500*time.Millisecond {
				t.Errorf("stopped accepting %v after SIGTERM, before --handover-timeout 2s", d)
			}
			t.Logf("readiness after the hand-over timeout: %s", strings.TrimSpace(body))
			break
		}
		if time.Since(sigterm) > 10*time.Second {
			t.Fatalf("readiness still %d %q 10 s after SIGTERM", code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
