// Package e2e holds warren's end-to-end tests on the lab: real BPF on real
// cgroups, real traffic between network namespaces, real node agents.
package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"testing"

	"github.com/warren-mesh/warren/internal/testenv"
	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

var (
	appPath   string
	agentPath string
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
			if appPath, err = lab.BuildApp(dir); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			if agentPath, err = lab.BuildCommand(dir, mesh.AgentPackage); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

// cluster wraps mesh.Cluster with helpers that fail the test.
type cluster struct {
	c    *mesh.Cluster
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
	c, err := mesh.NewCluster(l, appPath)
	if err != nil {
		t.Fatal(err)
	}
	return &cluster{c: c, lab: l, pods: c.Pods}
}

func (c *cluster) pod(name string) *lab.Pod { return c.c.Pod(name) }

func (c *cluster) serve(t *testing.T, pod *lab.Pod, args ...string) *lab.Process {
	t.Helper()
	p, err := c.c.Serve(pod, args...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (c *cluster) probe(t *testing.T, pod *lab.Pod, addr netip.AddrPort, msg string) mesh.ProbeResult {
	t.Helper()
	r, err := c.c.Probe(pod, addr, msg)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (c *cluster) run(t *testing.T, pod *lab.Pod, args ...string) (string, error) {
	t.Helper()
	return c.c.Run(pod, args...)
}
