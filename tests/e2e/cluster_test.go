// Package e2e holds warren's end-to-end tests on the lab: real BPF on real
// cgroups, real traffic between network namespaces.
package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/warren-mesh/warren/internal/testenv"
	"github.com/warren-mesh/warren/tests/lab"
)

var (
	appPath string
	binDir  string // where TestMain builds binaries
)

func TestMain(m *testing.M) {
	code := func() int {
		if os.Geteuid() == 0 {
			dir, err := os.MkdirTemp("", "warren-e2e")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			defer os.RemoveAll(dir)
			binDir = dir
			if appPath, err = lab.BuildApp(dir); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

// cluster is the standard e2e topology: node1 {client1, server1}, node2 {client2, server2}.
type cluster struct {
	lab  *lab.Lab
	pods map[string]*lab.Pod
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	testenv.RequireRoot(t)
	l, err := lab.New(lab.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("close lab: %v", err)
		}
	})
	c := &cluster{lab: l, pods: map[string]*lab.Pod{}}
	for _, spec := range []struct{ node, pod string }{{"node1", "client1"}, {"node1", "server1"}, {"node2", "client2"}, {"node2", "server2"}} {
		n := l.Node(spec.node)
		if n == nil {
			if n, err = l.AddNode(spec.node); err != nil {
				t.Fatal(err)
			}
		}
		p, err := n.AddPod(spec.pod)
		if err != nil {
			t.Fatal(err)
		}
		c.pods[spec.pod] = p
	}
	return c
}

func (c *cluster) pod(name string) *lab.Pod { return c.pods[name] }

// serve starts a labapp server in pod and waits until it listens.
func (c *cluster) serve(t *testing.T, pod *lab.Pod, args ...string) *lab.Process {
	t.Helper()
	proc, err := pod.Start(appPath, args...)
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.WaitOutput("listening", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return proc
}

type probeResult struct{ Local, Remote, Reply string }

// probe runs labapp probe in pod (so cgroup programs see it as the pod's).
func (c *cluster) probe(t *testing.T, pod *lab.Pod, addr netip.AddrPort, msg string) probeResult {
	t.Helper()
	proc, err := pod.Start(appPath, "probe", "-c", addr.String(), "-m", msg, "-timeout", "10s")
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.Wait(); err != nil {
		t.Fatalf("probe %s from %s: %v", addr, pod.Name(), err)
	}
	var r probeResult
	if err := json.Unmarshal([]byte(proc.Output()), &r); err != nil {
		t.Fatalf("probe output %q: %v", proc.Output(), err)
	}
	return r
}
