// Package mesh runs warren on the lab: a standard topology of pods, one node
// agent per node with the local-file provider and the built-in CA, and the
// helpers that end-to-end tests, the demo and the benchmarks share to drive
// traffic and read what the agents report.
//
// Topology: node1 {client1, server1}, node2 {client2, server2, outside}. The
// clients run as service account "client", the servers as "server", all in
// namespace "default"; "outside" is never in the mesh. The echo service
// (VIP 198.18.200.10, port 80 → 9000) is backed by both servers.
package mesh

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"

	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/tests/lab"
)

// AgentPackage is the node agent's import path, for lab.BuildCommand.
const AgentPackage = "github.com/warren-mesh/warren/cmd/nodeagent"

// EchoVIP is the echo service's virtual IP.
var EchoVIP = netip.MustParseAddr("198.18.200.10")

// Cluster is the standard topology on a lab, without agents.
type Cluster struct {
	Lab     *lab.Lab
	Pods    map[string]*lab.Pod
	AppPath string // the labapp binary
}

// NewCluster adds the standard nodes and pods to l.
func NewCluster(l *lab.Lab, appPath string) (*Cluster, error) {
	c := &Cluster{Lab: l, Pods: map[string]*lab.Pod{}, AppPath: appPath}
	for _, spec := range []struct{ node, pod string }{
		{"node1", "client1"}, {"node1", "server1"}, {"node2", "client2"}, {"node2", "server2"}, {"node2", "outside"},
	} {
		n := l.Node(spec.node)
		if n == nil {
			var err error
			if n, err = l.AddNode(spec.node); err != nil {
				return nil, err
			}
		}
		if err := c.AddPod(n, spec.pod); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// AddPod adds a pod to node n and to the cluster's index.
func (c *Cluster) AddPod(n *lab.Node, name string) error {
	p, err := n.AddPod(name)
	if err != nil {
		return err
	}
	c.Pods[name] = p
	return nil
}

// Pod returns the named pod.
func (c *Cluster) Pod(name string) *lab.Pod { return c.Pods[name] }

// Serve starts a labapp server in pod and waits until it listens.
func (c *Cluster) Serve(pod *lab.Pod, args ...string) (*lab.Process, error) {
	proc, err := pod.Start(c.AppPath, args...)
	if err != nil {
		return nil, err
	}
	if err := proc.WaitOutput("listening", 10*time.Second); err != nil {
		proc.Stop()
		return nil, err
	}
	return proc, nil
}

// Run runs labapp in pod to completion and returns its output.
func (c *Cluster) Run(pod *lab.Pod, args ...string) (string, error) {
	proc, err := pod.Start(c.AppPath, args...)
	if err != nil {
		return "", err
	}
	err = proc.Wait()
	return proc.Output(), err
}

// ProbeResult is labapp probe's answer.
type ProbeResult struct{ Local, Remote, Reply string }

// Probe connects from pod to addr, sends msg, half-closes and returns the reply.
func (c *Cluster) Probe(pod *lab.Pod, addr netip.AddrPort, msg string) (ProbeResult, error) {
	out, err := c.Run(pod, "probe", "-c", addr.String(), "-m", msg, "-timeout", "10s")
	if err != nil {
		return ProbeResult{}, fmt.Errorf("probe %s from %s: %w", addr, pod.Name(), err)
	}
	var r ProbeResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return r, fmt.Errorf("probe output %q: %w", out, err)
	}
	return r, nil
}

// SourceResult is labapp source's answer.
type SourceResult struct {
	Bytes   int64
	OK      bool
	Local   string
	Seconds float64
}

// Source sends n bytes from pod to a sink at addr and checks the sink's sha256.
func (c *Cluster) Source(pod *lab.Pod, addr netip.AddrPort, n int64) (SourceResult, error) {
	return c.SourcePaced(pod, addr, n, 0)
}

// SourcePaced is Source with the bytes spread over at least pace (0: as
// fast as possible), for a transfer that must outlast something.
func (c *Cluster) SourcePaced(pod *lab.Pod, addr netip.AddrPort, n int64, pace time.Duration) (SourceResult, error) {
	out, err := c.Run(pod, "source", "-c", addr.String(), "-n", fmt.Sprint(n), "-pace", pace.String(), "-timeout", "300s")
	if err != nil {
		return SourceResult{}, fmt.Errorf("source %s -> %s: %w", pod.Name(), addr, err)
	}
	var r SourceResult
	if err := json.Unmarshal([]byte(out), &r); err != nil || !r.OK {
		return r, fmt.Errorf("source %s -> %s: %q %v", pod.Name(), addr, out, err)
	}
	return r, nil
}

// Mesh is the cluster with a node agent per node.
type Mesh struct {
	*Cluster
	AgentPath string
	Dir       string // configuration file and CA
	CfgPath   string
	Agents    map[string]*lab.Process
	// Holders are the nodes' listener holders (nodeagent fdstore), started
	// with each node's first agent.
	Holders map[string]*lab.Process
	// CAArgs replace the built-in CA's flags (--ca-dir <Dir>/ca), e.g.
	// --ca-provider spire --spire-admin-socket <path>.
	CAArgs  []string
	Applied []byte // the last file Apply wrote
}

// Spec is the configuration file's content.
type Spec struct {
	Workloads []map[string]any
	Services  []map[string]any
	Policies  []map[string]any
	// Mode is the mesh-wide peer-authentication mode, STRICT or PERMISSIVE.
	Mode string
}

// New writes a CA and the default configuration into dir and starts an agent on every node.
func New(c *Cluster, agentPath, dir string) (*Mesh, error) {
	m := &Mesh{Cluster: c, AgentPath: agentPath, Dir: dir, CfgPath: filepath.Join(dir, "mesh.yaml"), Agents: map[string]*lab.Process{}}
	caDir := filepath.Join(dir, "ca")
	cert, key, err := builtinca.GenerateRoot(builtinca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")})
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(caDir, 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(caDir, builtinca.CertFile), cert, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(caDir, builtinca.KeyFile), key, 0o600); err != nil {
		return nil, err
	}
	if err := m.Apply(m.DefaultSpec()); err != nil {
		return nil, err
	}
	for _, n := range c.Lab.Nodes() {
		if _, err := m.StartAgent(n, nil); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Workload returns the configuration entry of a lab pod, with extra keys.
func (m *Mesh) Workload(name, sa string, extra map[string]any) map[string]any {
	p := m.Pod(name)
	w := map[string]any{
		"uid": "lab//v1/Pod/default/" + name, "name": name, "namespace": "default", "serviceAccount": sa,
		"workloadIps": []string{p.IPv4().String(), p.IPv6().String()}, "protocol": "HBONE",
		"node": p.Node().Name(), "netnsPath": p.NetNSPath(),
	}
	for k, v := range extra {
		w[k] = v
	}
	return w
}

// DefaultSpec: the four mesh pods, the echo service on both servers, no
// policies, PERMISSIVE.
func (m *Mesh) DefaultSpec() Spec {
	echo := map[string]any{"services": map[string]any{"default/echo.default.svc.cluster.local": map[string]int{"80": 9000}}}
	return Spec{
		Workloads: []map[string]any{
			m.Workload("client1", "client", nil), m.Workload("server1", "server", echo),
			m.Workload("client2", "client", nil), m.Workload("server2", "server", echo),
		},
		Services: []map[string]any{{
			"name": "echo", "namespace": "default", "hostname": "echo.default.svc.cluster.local",
			"vips": []string{"/" + EchoVIP.String()}, "ports": map[string]int{"80": 9000},
		}},
		Mode: "PERMISSIVE",
	}
}

// Apply writes spec to the configuration file and waits until every running agent applies it.
func (m *Mesh) Apply(spec Spec) error {
	doc := map[string]any{"workloads": spec.Workloads, "services": spec.Services, "policies": spec.Policies,
		"peerAuthentications": []map[string]any{{"name": "default", "namespace": "istio-system", "scope": "Global", "mode": spec.Mode}}}
	if spec.Policies == nil {
		doc["policies"] = []any{}
	}
	b, err := yaml.Marshal(doc)
	if err != nil {
		return err
	}
	if err := m.WriteRaw(b); err != nil {
		return err
	}
	m.Applied = b
	sum := fmt.Sprintf("%x", sha256.Sum256(b))
	for _, n := range m.Lab.Nodes() {
		if m.Agents[n.Name()] != nil {
			if err := m.WaitConfig(n, sum); err != nil {
				return err
			}
		}
	}
	return nil
}

// WriteRaw replaces the configuration file with b, atomically as an
// operator's tooling would.
func (m *Mesh) WriteRaw(b []byte) error {
	tmp := m.CfgPath + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, m.CfgPath)
}

// ProviderStatus is the configuration provider's state in /config_dump.
type ProviderStatus struct {
	SHA256     string
	LastError  string
	Rejections uint64
}

// Status reads the configuration provider's state of n's agent.
func (m *Mesh) Status(n *lab.Node) (ProviderStatus, error) {
	var dump struct{ Provider ProviderStatus }
	body, err := m.Admin(n, "/config_dump")
	if err != nil {
		return dump.Provider, err
	}
	if err := json.Unmarshal(body, &dump); err != nil {
		return dump.Provider, fmt.Errorf("config_dump on %s: %w", n.Name(), err)
	}
	return dump.Provider, nil
}

// Admin GETs path from n's agent admin API.
func (m *Mesh) Admin(n *lab.Node, path string) ([]byte, error) {
	code, body, err := NodeGet(n, "http://127.0.0.1:15000"+path)
	if err != nil {
		return nil, fmt.Errorf("admin %s on %s: %w", path, n.Name(), err)
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("admin %s on %s: %d %s", path, n.Name(), code, body)
	}
	return []byte(body), nil
}

// WaitConfig waits until n's agent applies the file version with sha256 sum.
func (m *Mesh) WaitConfig(n *lab.Node, sum string) error {
	deadline := time.Now().Add(10 * time.Second)
	var st ProviderStatus
	var err error
	for time.Now().Before(deadline) {
		if st, err = m.Status(n); err == nil && st.SHA256 == sum {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("agent on %s did not apply the new configuration: %+v %v", n.Name(), st, err)
}

// StateDir is node n's state directory (hand-over and fd-holder sockets).
func (m *Mesh) StateDir(n *lab.Node) string { return filepath.Join(m.Dir, "state", n.Name()) }

// StartHolder runs n's listener holder (nodeagent fdstore) in its state
// directory and waits until its socket answers.
func (m *Mesh) StartHolder(n *lab.Node) (*lab.Process, error) {
	if m.Holders == nil {
		m.Holders = map[string]*lab.Process{}
	}
	proc, err := n.Start(m.AgentPath, "fdstore", "--state-dir", m.StateDir(n))
	if err != nil {
		return nil, err
	}
	m.Holders[n.Name()] = proc
	sock := filepath.Join(m.StateDir(n), "fdstore.sock")
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return proc, nil
		}
	}
	return proc, fmt.Errorf("listener holder on %s: no socket at %s\n%s", n.Name(), sock, proc.Output())
}

// StartAgent runs a node agent on n with extra flags and waits until it is ready.
func (m *Mesh) StartAgent(n *lab.Node, extra []string) (*lab.Process, error) {
	ca := m.CAArgs
	if ca == nil {
		ca = []string{"--ca-dir", filepath.Join(m.Dir, "ca")}
	}
	args := append(append([]string{"run", "--config", m.CfgPath, "--node", n.Name()}, ca...),
		"--cgroup-root", n.CgroupRoot(), "--pin-dir", n.PinDir(),
		"--exempt-sources", n.IPv4().String()+","+n.IPv6().String(), "--drain-timeout", "5s",
		// Each lab node is a host of its own: its agents meet only each other.
		"--state-dir", m.StateDir(n))
	args = append(args, extra...)
	if m.Holders[n.Name()] == nil && !slices.Contains(extra, "--fd-store") {
		if _, err := m.StartHolder(n); err != nil {
			return nil, err
		}
	}
	proc, err := n.Start(m.AgentPath, args...)
	if err != nil {
		return nil, err
	}
	m.Agents[n.Name()] = proc
	readyAddr := n.IPv4().String() + ":15021"
	for i, a := range extra {
		if a == "--ready-addr" && i+1 < len(extra) {
			readyAddr = extra[i+1]
		}
	}
	if err := m.WaitReady(n, proc, readyAddr); err != nil {
		return proc, err
	}
	return proc, nil
}

// WaitReady waits until the agent proc on n answers 200 on addr's /healthz/ready.
func (m *Mesh) WaitReady(n *lab.Node, proc *lab.Process, addr string) error {
	deadline := time.Now().Add(20 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		select {
		case <-proc.Done():
			return fmt.Errorf("agent on %s exited: %v", n.Name(), proc.Wait())
		default:
		}
		code, body, err := NodeGet(n, "http://"+addr+"/healthz/ready")
		if err == nil && code == http.StatusOK {
			return nil
		}
		last = fmt.Sprint(code, " ", body, " ", err)
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("agent on %s not ready: %s\n%s", n.Name(), last, proc.Output())
}

// NodeGet fetches url from inside the node's network namespace.
func NodeGet(n *lab.Node, url string) (int, string, error) {
	return nodeDo(n, http.MethodGet, url)
}

// NodePost POSTs an empty body to url from inside the node's network namespace.
func NodePost(n *lab.Node, url string) (int, string, error) {
	return nodeDo(n, http.MethodPost, url)
}

// nodeDo sends one request whose connection is dialed inside n's namespace.
func nodeDo(n *lab.Node, method, url string) (int, string, error) {
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
		err = n.Do(func() error {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// Metrics returns the Prometheus text of n's agent.
func (m *Mesh) Metrics(n *lab.Node) (string, error) {
	code, body, err := NodeGet(n, fmt.Sprintf("http://%s/metrics", net.JoinHostPort(n.IPv4().String(), "15020")))
	if err != nil {
		return "", fmt.Errorf("metrics of %s: %w", n.Name(), err)
	}
	if code != http.StatusOK {
		return "", fmt.Errorf("metrics of %s: %d", n.Name(), code)
	}
	return body, nil
}

// Metric returns the sum of a counter's series on node whose labels include all of want.
func (m *Mesh) Metric(node, name string, want map[string]string) (float64, error) {
	body, err := m.Metrics(m.Lab.Node(node))
	if err != nil {
		return 0, err
	}
	return SumSeries(body, name, want), nil
}

// SumSeries sums the series of a metric in Prometheus text whose labels include all of want.
func SumSeries(text, name string, want map[string]string) float64 {
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(line, fmt.Sprintf("%s=%q", k, v)) {
				ok = false
			}
		}
		if ok {
			var v float64
			fmt.Sscan(line[strings.LastIndex(line, " ")+1:], &v)
			sum += v
		}
	}
	return sum
}

// Stop stops every agent (the lab's Close would too) and reports failures.
func (m *Mesh) Stop() error {
	var errs []error
	for _, p := range m.Agents {
		// SIGINT: no successor will come, do not wait for one.
		p.Signal(syscall.SIGINT)
	}
	for _, p := range m.Agents {
		errs = append(errs, p.Stop())
	}
	for _, p := range m.Holders {
		errs = append(errs, p.Stop())
	}
	return errors.Join(errs...)
}
