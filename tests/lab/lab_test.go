package lab

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/warren-mesh/warren/internal/cgroup2"
	"github.com/warren-mesh/warren/internal/testenv"
)

var appPath string

func TestMain(m *testing.M) {
	code := func() int {
		if os.Geteuid() == 0 {
			dir, err := os.MkdirTemp("", "labapp")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			defer os.RemoveAll(dir)
			if appPath, err = BuildApp(dir); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

func newLab(t *testing.T) *Lab {
	t.Helper()
	testenv.RequireRoot(t)
	l, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("close lab: %v", err)
		}
	})
	return l
}

// cluster builds 2 nodes x 2 pods.
func cluster(t *testing.T, l *Lab) [][]*Pod {
	t.Helper()
	var pods [][]*Pod
	for _, nn := range []string{"node1", "node2"} {
		n, err := l.AddNode(nn)
		if err != nil {
			t.Fatal(err)
		}
		var row []*Pod
		for _, pn := range []string{"a", "b"} {
			p, err := n.AddPod(pn + nn[len(nn)-1:])
			if err != nil {
				t.Fatal(err)
			}
			row = append(row, p)
		}
		pods = append(pods, row)
	}
	return pods
}

func startServer(t *testing.T, p *Pod, args ...string) *Process {
	t.Helper()
	proc, err := p.Start(appPath, args...)
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.WaitOutput("listening", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return proc
}

type probeResult struct{ Local, Remote, Reply string }

func runProbe(t *testing.T, p *Pod, addr netip.AddrPort, msg string) probeResult {
	t.Helper()
	proc, err := p.Start(appPath, "probe", "-c", addr.String(), "-m", msg, "-timeout", "10s")
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.Wait(); err != nil {
		t.Fatalf("probe %s from %s: %v", addr, p.Name(), err)
	}
	var r probeResult
	if err := json.Unmarshal([]byte(proc.Output()), &r); err != nil {
		t.Fatalf("probe output %q: %v", proc.Output(), err)
	}
	return r
}

func TestPodToPodTCP(t *testing.T) {
	l := newLab(t)
	pods := cluster(t, l)
	server := pods[1][1] // node2/b2
	startServer(t, server, "whoami", "-l", ":8080")
	cases := []struct {
		name   string
		client *Pod
	}{
		{"same node", pods[1][0]},
		{"across nodes", pods[0][0]},
	}
	for _, c := range cases {
		for _, dst := range []netip.Addr{server.IPv4(), server.IPv6()} {
			t.Run(fmt.Sprintf("%s/%s", c.name, dst), func(t *testing.T) {
				addr := netip.AddrPortFrom(dst, 8080)
				r := runProbe(t, c.client, addr, "ping-"+c.name)
				// whoami answers "<local> <remote>\n" then echoes: both ends saw pod addresses, no NAT.
				wantSrc := c.client.IPv4()
				if dst.Is6() {
					wantSrc = c.client.IPv6()
				}
				first, echo, _ := strings.Cut(r.Reply, "\n")
				fields := strings.Fields(first)
				if len(fields) != 2 {
					t.Fatalf("whoami reply %q", r.Reply)
				}
				if got := netip.MustParseAddrPort(fields[0]); got != addr {
					t.Errorf("server local address %s, want %s", got, addr)
				}
				if got := netip.MustParseAddrPort(fields[1]).Addr(); got != wantSrc {
					t.Errorf("server saw client %s, want %s", got, wantSrc)
				}
				if echo != "ping-"+c.name {
					t.Errorf("echo %q, want %q", echo, "ping-"+c.name)
				}
			})
		}
	}
}

func TestBulkIntegrityAcrossNodes(t *testing.T) {
	l := newLab(t)
	pods := cluster(t, l)
	startServer(t, pods[1][0], "sink", "-l", ":9000")
	for _, dst := range []netip.Addr{pods[1][0].IPv4(), pods[1][0].IPv6()} {
		proc, err := pods[0][1].Start(appPath, "source", "-c", netip.AddrPortFrom(dst, 9000).String(), "-n", "33554432", "-seed", "7")
		if err != nil {
			t.Fatal(err)
		}
		if err := proc.Wait(); err != nil {
			t.Fatalf("source to %s: %v", dst, err)
		}
		if !strings.Contains(proc.Output(), `"ok":true`) {
			t.Fatalf("source to %s: %s", dst, proc.Output())
		}
	}
}

func TestPodProcessesRunInPodCgroup(t *testing.T) {
	l := newLab(t)
	pods := cluster(t, l)
	srv := startServer(t, pods[0][0], "echo", "-l", ":7000")
	data, err := os.ReadFile(filepath.Join(pods[0][0].CgroupPath(), "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(strings.Fields(string(data)), fmt.Sprint(srv.PID())) {
		t.Fatalf("pid %d not in %s (cgroup.procs: %q)", srv.PID(), pods[0][0].CgroupPath(), data)
	}
	cg, err := cgroup2.Mount()
	if err != nil {
		t.Fatal(err)
	}
	self, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", srv.PID()))
	if err != nil {
		t.Fatal(err)
	}
	rel, _ := filepath.Rel(cg, pods[0][0].CgroupPath())
	if !strings.Contains(string(self), "0::/"+rel) {
		t.Fatalf("/proc/%d/cgroup = %q, want 0::/%s", srv.PID(), self, rel)
	}
	// The node's processes have their own cgroup and network namespace.
	np, err := l.Node("node1").Start("sleep", "30")
	if err != nil {
		t.Fatal(err)
	}
	if err := np.Stop(); err != nil {
		t.Fatal(err)
	}
}

func TestNodeReachesPods(t *testing.T) {
	l := newLab(t)
	pods := cluster(t, l)
	startServer(t, pods[1][1], "echo", "-l", ":7001")
	// From node1's namespace, through the Go API: the agent's view.
	for _, dst := range []netip.Addr{pods[1][1].IPv4(), pods[1][1].IPv6()} {
		var c net.Conn
		err := l.Node("node1").Do(func() (err error) {
			c, err = net.DialTimeout("tcp", netip.AddrPortFrom(dst, 7001).String(), 5*time.Second)
			return err
		})
		if err != nil {
			t.Fatalf("dial %s from node1: %v", dst, err)
		}
		fmt.Fprint(c, "x")
		buf := make([]byte, 1)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(buf); err != nil || buf[0] != 'x' {
			t.Fatalf("echo from %s: %q %v", dst, buf, err)
		}
		c.Close()
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	testenv.RequireRoot(t)
	for _, cfg := range []Config{
		{Prefix: "bad prefix"},
		{Prefix: "xx123456"},
		{UnderlayV4: netip.MustParsePrefix("10.0.0.0/24")},
		{UnderlayV6: netip.MustParsePrefix("fd00::/64")},
		{PodsV4: netip.MustParsePrefix("198.19.0.0/24")}, // too small for a /24 per node
		{PodsV4: netip.MustParsePrefix("198.18.0.0/16")}, // overlaps the underlay
	} {
		before := snapshot(t)
		if l, err := New(cfg); err == nil {
			l.Close()
			t.Errorf("New(%+v) succeeded, want an error", cfg)
		} else if !strings.Contains(err.Error(), "lab:") {
			t.Errorf("New(%+v): unclear error %v", cfg, err)
		}
		if after := snapshot(t); !slices.Equal(before, after) {
			t.Errorf("New(%+v) changed the host: %v -> %v", cfg, before, after)
		}
	}

	l := newLab(t)
	n, err := l.AddNode("node1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.AddPod("a"); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, l)
	for name, fn := range map[string]func() error{
		"duplicate node": func() error { _, err := l.AddNode("node1"); return err },
		"bad node name":  func() error { _, err := l.AddNode("Node_1"); return err },
		"long node name": func() error { _, err := l.AddNode("averyveryverylongname"); return err },
		"duplicate pod":  func() error { _, err := n.AddPod("a"); return err },
		"bad pod name":   func() error { _, err := n.AddPod("../x"); return err },
		"missing binary": func() error { _, err := n.Start("/nonexistent/binary"); return err },
	} {
		if err := fn(); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if after := snapshot(t, l); !slices.Equal(before, after) {
		t.Errorf("bad input changed the host: %v -> %v", before, after)
	}
	if got := len(n.Pods()); got != 1 {
		t.Errorf("node has %d pods after bad input, want 1", got)
	}
}

// labLinkRE matches the names labs give links (inside their namespaces):
// one of them in the host's namespace is a leak.
var labLinkRE = regexp.MustCompile(`^(br0|cni0|eth0|vp[0-9]+|n[0-9]+)$`)

// snapshot lists what labs leave on a host: the host's links, and the
// namespaces and cgroups of lab runs that are over (no live process holds
// their lock) or whose prefix is in own. Other packages' tests and labs run at
// the same time; their live objects come and go and are not this test's.
func snapshot(t *testing.T, own ...*Lab) []string {
	t.Helper()
	counts := func(prefix string) bool {
		if !prefixRE.MatchString(prefix) {
			return false
		}
		for _, l := range own {
			if l.Prefix() == prefix {
				return true
			}
		}
		return !alive(prefix)
	}
	var out []string
	entries, _ := os.ReadDir(netnsDir)
	for _, e := range entries {
		if p, _, _ := strings.Cut(e.Name(), "-"); counts(p) {
			out = append(out, "netns:"+e.Name())
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		// Only links named as a lab names them count: other harnesses
		// (tests/cluster's bridge and its pods' CNI veths) live in the
		// host's namespace and check their own leftovers.
		if !labLinkRE.MatchString(l.Attrs().Name) {
			continue
		}
		out = append(out, "link:"+l.Attrs().Name)
	}
	cg, err := cgroup2.Mount()
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(cg, cgroupDir)
	filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() || path == root {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		if p, _, _ := strings.Cut(rel, "/"); counts(p) {
			out = append(out, "cgroup:"+path)
		}
		return nil
	})
	slices.Sort(out)
	return out
}

func TestCloseLeavesNothing(t *testing.T) {
	testenv.RequireRoot(t)
	before := snapshot(t)
	l, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	pods := cluster(t, l)
	startServer(t, pods[0][0], "echo", "-l", ":7002")
	if err := os.MkdirAll(l.PinDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	if mid := snapshot(t, l); slices.Equal(before, mid) {
		t.Fatal("lab created nothing visible")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if after := snapshot(t); !slices.Equal(before, after) {
		t.Fatalf("after Close: %v, before: %v", after, before)
	}
	if _, err := os.Stat(l.PinDir()); !os.IsNotExist(err) {
		t.Fatalf("pin dir %s remains: %v", l.PinDir(), err)
	}
}

func TestStaleRunIsRemoved(t *testing.T) {
	testenv.RequireRoot(t)
	before := snapshot(t)
	l, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	pods := cluster(t, l)
	proc := startServer(t, pods[1][0], "echo", "-l", ":7003")
	// Simulate a crash: drop the lock without cleaning up.
	l.lock.Close()
	if err := CleanStale(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-proc.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("process %d of the stale run still runs", proc.PID())
	}
	if after := snapshot(t); !slices.Equal(before, after) {
		t.Fatalf("after CleanStale: %v, before: %v", after, before)
	}
	l.Close()
}

func TestLiveRunIsKept(t *testing.T) {
	l := newLab(t)
	n, err := l.AddNode("node1")
	if err != nil {
		t.Fatal(err)
	}
	if err := CleanStale(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.NetNSPath()); err != nil {
		t.Fatalf("CleanStale removed a live run's namespace: %v", err)
	}
	if _, err := New(Config{Prefix: l.Prefix()}); err == nil {
		t.Fatal("a second lab took a live run's prefix")
	}
}

func TestCreateDestroyCyclesLeakNothing(t *testing.T) {
	testenv.RequireRoot(t)
	cycles := 100
	if testing.Short() {
		cycles = 10
	}
	before := snapshot(t)
	start := time.Now()
	for i := 0; i < cycles; i++ {
		l, err := New(Config{})
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		for _, nn := range []string{"node1", "node2"} {
			n, err := l.AddNode(nn)
			if err != nil {
				t.Fatalf("cycle %d: %v", i, err)
			}
			for _, pn := range []string{"a", "b"} {
				if _, err := n.AddPod(pn + nn[4:]); err != nil {
					t.Fatalf("cycle %d: %v", i, err)
				}
			}
		}
		if err := l.Close(); err != nil {
			t.Fatalf("cycle %d: close: %v", i, err)
		}
	}
	t.Logf("%d cycles of 2 nodes x 2 pods in %s", cycles, time.Since(start))
	if after := snapshot(t); !slices.Equal(before, after) {
		t.Fatalf("after %d cycles: %v, before: %v", cycles, after, before)
	}
}
