package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/warren-mesh/warren/tests/lab"
	"github.com/warren-mesh/warren/tests/mesh"
)

// Scenario names, in the order a run measures them.
const (
	ScenarioBulk1         = "bulk_1_stream"
	ScenarioBulk8         = "bulk_8_streams"
	ScenarioRR            = "rr_1000rps"
	ScenarioConns         = "new_conns"
	ScenarioCPU           = "cpu_per_1k_req"
	ScenarioIdle          = "idle_conns"
	PathDirect            = "direct"
	PathDirectSame        = "direct_same_node"
	PathWarren            = "warren"
	PathWarrenSame        = "warren_same_node"
	PathTunnel            = "tunnel"
	PathHAProxy           = "haproxy"
	drainPort             = 9100
	echoPort              = 9200
	maxNoFile      uint64 = 1 << 20
)

// PathWarrenSameFast and PathWarrenSameHBONE are warren_same_node with the
// agents restarted with --same-node-fast-path on or off before each of
// their measurements: asked for by -paths only, to compare the two in one
// run.
const (
	PathWarrenSameFast  = "warren_same_node_fast"
	PathWarrenSameHBONE = "warren_same_node_hbone"
)

// Scenarios lists every scenario in measuring order.
var Scenarios = []string{ScenarioBulk1, ScenarioBulk8, ScenarioRR, ScenarioConns, ScenarioCPU, ScenarioIdle}

// Paths lists every path a run measures by default.
var Paths = []string{PathDirect, PathWarren, PathTunnel, PathHAProxy, PathDirectSame, PathWarrenSame}

// ExtraPaths are measured only when -paths names them.
var ExtraPaths = []string{PathWarrenSameFast, PathWarrenSameHBONE}

// allPaths is Paths then ExtraPaths, the order paths are measured and reported in.
var allPaths = slices.Concat(Paths, ExtraPaths)

// pairPaths are the classic mTLS tunnel pairs; ratios are taken against
// the better of them for each figure.
var pairPaths = []string{PathTunnel, PathHAProxy}

// Options sizes a run. Zero fields take Defaults' values.
type Options struct {
	// Runs is how many times each scenario runs on each path.
	Runs int
	// Bulk is the length of a bulk transfer, Load of the fixed-rate
	// request/response run, Short of the new-connection and CPU runs.
	Bulk, Load, Short time.Duration
	// Rate and LoadConns shape scenario 3; Streams scenario 2; Workers the
	// concurrent connect loops of scenario 4.
	Rate                        float64
	LoadConns, Streams, Workers int
	// Idle is the number of connections scenario 5 holds on the warren
	// paths; TunnelIdle on the tunnel path, whose stunnel4 runs a thread
	// per connection on each end (10,000 would be 20,000 threads on a
	// shared host with pid_max 32768).
	Idle, TunnelIdle int
	// Scenarios and Paths restrict the run (default all).
	Scenarios, Paths []string
	// ProfileDir, when set, receives CPU and heap profiles of the agents
	// taken in an extra, unmeasured pass after the runs.
	ProfileDir string
	// AgentEnv is extra environment for the agents (experiments such as
	// GOMAXPROCS=1); it is set in this process only while they start.
	AgentEnv []string
	// Stunnel is the stunnel binary, HAProxy the haproxy binary.
	Stunnel, HAProxy string
	// QuietLoad is the 1-minute load below which a run counts as taken on
	// a quiet machine (default 1.5); the report says when it was not.
	QuietLoad float64
	// Log receives progress lines (nil: discarded).
	Log io.Writer
}

// Defaults returns the full run's options, or the short mode's (CI: under 2 minutes).
func Defaults(short bool) Options {
	if short {
		return Options{Runs: 1, Bulk: time.Second, Load: 2 * time.Second, Short: time.Second, Rate: 1000,
			LoadConns: 4, Streams: 8, Workers: 8, Idle: 500, TunnelIdle: 200, Stunnel: "stunnel4", HAProxy: "haproxy"}
	}
	return Options{Runs: 5, Bulk: 4 * time.Second, Load: 10 * time.Second, Short: 4 * time.Second, Rate: 1000,
		LoadConns: 4, Streams: 8, Workers: 8, Idle: 10000, TunnelIdle: 2000, Stunnel: "stunnel4", HAProxy: "haproxy"}
}

func (o *Options) fill(short bool) {
	d := Defaults(short)
	set := func(v *int, dv int) {
		if *v == 0 {
			*v = dv
		}
	}
	setD := func(v *time.Duration, dv time.Duration) {
		if *v == 0 {
			*v = dv
		}
	}
	set(&o.Runs, d.Runs)
	set(&o.LoadConns, d.LoadConns)
	set(&o.Streams, d.Streams)
	set(&o.Workers, d.Workers)
	set(&o.Idle, d.Idle)
	set(&o.TunnelIdle, d.TunnelIdle)
	setD(&o.Bulk, d.Bulk)
	setD(&o.Load, d.Load)
	setD(&o.Short, d.Short)
	if o.Rate == 0 {
		o.Rate = d.Rate
	}
	if o.Stunnel == "" {
		o.Stunnel = d.Stunnel
	}
	if o.HAProxy == "" {
		o.HAProxy = d.HAProxy
	}
	if len(o.Scenarios) == 0 {
		o.Scenarios = Scenarios
	}
	if len(o.Paths) == 0 {
		o.Paths = Paths
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
}

// Result is one scenario on one path: every run's metrics and their medians.
type Result struct {
	Scenario string               `json:"scenario"`
	Path     string               `json:"path"`
	Median   map[string]float64   `json:"median"`
	Runs     []map[string]float64 `json:"runs"`
}

// Machine describes where and under what load the figures were taken.
type Machine struct {
	CPU        string  `json:"cpu"`
	CPUs       int     `json:"cpus"`
	Kernel     string  `json:"kernel"`
	Go         string  `json:"go"`
	Stunnel    string  `json:"stunnel"`
	HAProxy    string  `json:"haproxy"`
	MemTotal   string  `json:"mem_total"`
	Load1Start float64 `json:"load1_start"`
	// Quiet: the run started with the 1-minute load below QuietLimit
	// (the -wait-load threshold, 1.5 when none was given).
	Quiet      bool      `json:"quiet"`
	QuietLimit float64   `json:"quiet_limit"`
	Load1End   float64   `json:"load1_end"`
	Load1Max   float64   `json:"load1_max"`
	Start      time.Time `json:"start"`
	Seconds    float64   `json:"seconds"`
}

// Report is a run's output, written as JSON.
type Report struct {
	Machine  Machine  `json:"machine"`
	Options  any      `json:"options"`
	Physical Physical `json:"physical"`
	// AgentRSSStart is each agent's RSS right after it became ready with
	// the four mesh workloads (certificates, listeners, capture), before
	// any traffic.
	AgentRSSStart map[string]int64 `json:"agent_rss_start_bytes"`
	// AgentRSSAnonStart and AgentRSSFileStart split it into anonymous
	// memory (heap, stacks) and file-backed pages (the binary's text and
	// data touched so far, shared with the page cache).
	AgentRSSAnonStart map[string]int64 `json:"agent_rss_anon_start_bytes"`
	AgentRSSFileStart map[string]int64 `json:"agent_rss_file_start_bytes"`
	Results           []*Result        `json:"results"`
	Targets           []Target         `json:"targets"`
}

// Find returns the result of scenario on path, or nil.
func (r *Report) Find(scenario, path string) *Result {
	for _, res := range r.Results {
		if res.Scenario == scenario && res.Path == path {
			return res
		}
	}
	return nil
}

// env is the running lab, mesh and tunnel pair.
type env struct {
	opts    Options
	lab     *lab.Lab
	mesh    *mesh.Mesh
	tunnel  *tunnelPair
	haproxy *haproxyPair
	paths   map[string]*path
	appBin  string
	load    []float64
	noFile  int // RLIMIT_NOFILE of every process the run starts
	// agentArgs are the extra flags the running agents were started with.
	agentArgs []string
}

// path is a way from a client pod to a drain and an echo server.
type path struct {
	name        string
	client      *lab.Pod
	drain, echo netip.AddrPort
	proxies     func() []*lab.Process // processes whose CPU and RSS count as the path's cost
	// agentArgs, when set, are the agents' extra flags the path is measured
	// with: the agents are restarted with them before its measurement (and
	// with none before a path without).
	agentArgs []string
}

// Run builds the lab, the mesh and the tunnel pair, measures every scenario
// on every path opts.Runs times, and returns the report. short selects the
// defaults for fields opts leaves zero. ctx cancels between measurements.
func Run(ctx context.Context, opts Options, short bool) (*Report, error) {
	opts.fill(short)
	start := time.Now()
	rep := &Report{Machine: machine(opts.Stunnel, opts.HAProxy), Options: optionsJSON(opts), AgentRSSStart: map[string]int64{},
		AgentRSSAnonStart: map[string]int64{}, AgentRSSFileStart: map[string]int64{}}
	rep.Machine.Start = start.UTC()
	if rep.Machine.Stunnel == "" && slices.Contains(opts.Paths, PathTunnel) {
		return nil, fmt.Errorf("%s not found: make deps installs stunnel4", opts.Stunnel)
	}
	if rep.Machine.HAProxy == "" && slices.Contains(opts.Paths, PathHAProxy) {
		return nil, fmt.Errorf("%s not found: make deps installs haproxy", opts.HAProxy)
	}
	noFile, err := raiseNoFile(maxNoFile)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "warren-bench")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	fmt.Fprintln(opts.Log, "bench: building labapp and nodeagent")
	appBin, err := lab.BuildApp(dir)
	if err != nil {
		return nil, err
	}
	agentBin, err := lab.BuildCommand(dir, mesh.AgentPackage)
	if err != nil {
		return nil, err
	}
	l, err := lab.New(lab.Config{})
	if err != nil {
		return nil, err
	}
	defer l.Close()
	e := &env{opts: opts, lab: l, appBin: appBin, paths: map[string]*path{}, noFile: int(noFile)}
	if err := e.setup(dir, agentBin); err != nil {
		return nil, err
	}
	defer e.mesh.Stop()
	defer e.tunnel.stop()
	defer e.haproxy.stop()
	for n, p := range e.mesh.Agents {
		rep.AgentRSSStart[n], _ = procRSS(p.PID())
		rep.AgentRSSAnonStart[n], _ = procStatusKB(p.PID(), "RssAnon:")
		rep.AgentRSSFileStart[n], _ = procStatusKB(p.PID(), "RssFile:")
	}

	fmt.Fprintln(opts.Log, "bench: physical context")
	short2 := min(opts.Short, 2*time.Second)
	rep.Physical.AESGCMSealBytesPerS = measureAESGCM(short2 / 2)
	if rep.Physical.TLSBytesPerS, rep.Physical.TLSBytesPerCPUS, err = measureTLS(short2); err != nil {
		return nil, err
	}
	if rep.Physical.VethTCPBytesPerS, err = e.vethTCP(opts.Bulk); err != nil {
		return nil, err
	}

	results := map[[2]string]*Result{}
	for run := 0; run < opts.Runs; run++ {
		for _, sc := range opts.Scenarios {
			paths := e.pathsFor(sc)
			// Rotate the order each run so drift in the machine's load spreads over paths.
			for i := range paths {
				p := paths[(i+run)%len(paths)]
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				if err := e.agentsFor(p); err != nil {
					return nil, fmt.Errorf("run %d, %s on %s: %w", run+1, sc, p.name, err)
				}
				e.load = append(e.load, loadAvg())
				m, err := e.measure(sc, p)
				if err != nil {
					return nil, fmt.Errorf("run %d, %s on %s: %w", run+1, sc, p.name, err)
				}
				m["load1"] = loadAvg()
				fmt.Fprintf(opts.Log, "bench: run %d/%d %-15s %-17s %s\n", run+1, opts.Runs, sc, p.name, summary(sc, m))
				k := [2]string{sc, p.name}
				if results[k] == nil {
					results[k] = &Result{Scenario: sc, Path: p.name}
				}
				results[k].Runs = append(results[k].Runs, m)
			}
		}
	}
	for _, sc := range opts.Scenarios {
		for _, p := range allPaths {
			if r := results[[2]string{sc, p}]; r != nil {
				r.Median = medians(r.Runs)
				rep.Results = append(rep.Results, r)
			}
		}
	}
	rep.Targets = evaluate(rep)

	if opts.ProfileDir != "" {
		fmt.Fprintln(opts.Log, "bench: profiling the agents (unmeasured pass)")
		if err := e.profile(opts.ProfileDir); err != nil {
			return nil, err
		}
	}
	rep.Machine.Load1End = loadAvg()
	e.load = append(e.load, rep.Machine.Load1End)
	rep.Machine.Load1Start = e.load[0]
	rep.Machine.QuietLimit = opts.QuietLoad
	if rep.Machine.QuietLimit == 0 {
		rep.Machine.QuietLimit = 1.5
	}
	rep.Machine.Quiet = rep.Machine.Load1Start < rep.Machine.QuietLimit
	rep.Machine.Load1Max = slices.Max(e.load)
	rep.Machine.Seconds = time.Since(start).Seconds()
	return rep, nil
}

// pathsFor returns the paths a scenario runs on: the idle-connection
// scenario measures proxies, so it skips the direct paths.
func (e *env) pathsFor(sc string) []*path {
	var out []*path
	for _, name := range allPaths {
		p := e.paths[name]
		if p == nil || sc == ScenarioIdle && (name == PathDirect || name == PathDirectSame) {
			continue
		}
		out = append(out, p)
	}
	return out
}

// setup adds the bench pods, starts the agents, the servers and the tunnel pair.
func (e *env) setup(dir, agentBin string) error {
	c, err := mesh.NewCluster(e.lab, e.appBin)
	if err != nil {
		return err
	}
	n1, n2 := e.lab.Node("node1"), e.lab.Node("node2")
	for _, p := range []struct {
		n    *lab.Node
		name string
	}{{n1, "bclient"}, {n1, "bsame"}, {n2, "bserver"}} {
		if err := c.AddPod(p.n, p.name); err != nil {
			return err
		}
	}
	// Connection churn leaves TIME_WAIT sockets in the pods: let connects
	// reuse them and widen the ephemeral range (these are the lab's own
	// namespaces).
	for _, p := range c.Pods {
		if err := p.Do(func() error {
			for k, v := range map[string]string{"net/ipv4/tcp_tw_reuse": "1", "net/ipv4/ip_local_port_range": "1024 65000"} {
				if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644); err != nil {
					return fmt.Errorf("sysctl %s in %s: %w", k, p.Name(), err)
				}
			}
			return nil
		}); err != nil {
			return err
		}
	}
	fmt.Fprintln(e.opts.Log, "bench: starting the agents")
	restore := e.agentEnv()
	e.mesh, err = mesh.New(c, agentBin, dir)
	restore()
	if err != nil {
		return err
	}
	for _, s := range []string{"server1", "server2", "bserver", "bsame"} {
		if _, err := c.Serve(c.Pod(s), "drain", "-l", fmt.Sprintf(":%d", drainPort)); err != nil {
			return err
		}
		if _, err := c.Serve(c.Pod(s), "becho", "-l", fmt.Sprintf(":%d", echoPort)); err != nil {
			return err
		}
	}
	appPorts := []int{drainPort, echoPort}
	if slices.Contains(e.opts.Paths, PathTunnel) {
		if e.tunnel, err = newTunnelPair(e.opts.Stunnel, filepath.Join(dir, "tunnel"), c.Pod("bclient"), c.Pod("bserver"), appPorts); err != nil {
			return err
		}
		if err := e.tunnel.start(appPorts); err != nil {
			return err
		}
	} else {
		e.tunnel = &tunnelPair{}
	}
	e.haproxy = &haproxyPair{}
	if slices.Contains(e.opts.Paths, PathHAProxy) {
		// The HAProxy pair uses the stunnel pair's certificates.
		tdir := filepath.Join(dir, "tunnel")
		if e.tunnel.dir == "" {
			if _, err := newTunnelPair(e.opts.Stunnel, tdir, c.Pod("bclient"), c.Pod("bserver"), appPorts); err != nil {
				return err
			}
		}
		if e.haproxy, err = newHAProxyPair(e.opts.HAProxy, tdir, c.Pod("bclient"), c.Pod("bserver"), appPorts, e.haproxyIdle(), e.noFile); err != nil {
			return err
		}
		if err := e.haproxy.start(appPorts); err != nil {
			return err
		}
	}
	agents := func() []*lab.Process { return []*lab.Process{e.mesh.Agents["node1"], e.mesh.Agents["node2"]} }
	ap := func(pod string, port int) netip.AddrPort { return netip.AddrPortFrom(c.Pod(pod).IPv4(), uint16(port)) }
	loop := netip.MustParseAddr("127.0.0.1")
	all := map[string]*path{
		PathDirect:     {client: c.Pod("bclient"), drain: ap("bserver", drainPort), echo: ap("bserver", echoPort)},
		PathDirectSame: {client: c.Pod("bclient"), drain: ap("bsame", drainPort), echo: ap("bsame", echoPort)},
		PathWarren:     {client: c.Pod("client1"), drain: ap("server2", drainPort), echo: ap("server2", echoPort), proxies: agents},
		PathWarrenSame: {client: c.Pod("client1"), drain: ap("server1", drainPort), echo: ap("server1", echoPort), proxies: agents},
		PathWarrenSameFast: {client: c.Pod("client1"), drain: ap("server1", drainPort), echo: ap("server1", echoPort), proxies: agents,
			agentArgs: []string{"--same-node-fast-path=true"}},
		PathWarrenSameHBONE: {client: c.Pod("client1"), drain: ap("server1", drainPort), echo: ap("server1", echoPort), proxies: agents,
			agentArgs: []string{"--same-node-fast-path=false"}},
		PathTunnel: {client: c.Pod("bclient"), drain: netip.AddrPortFrom(loop, tunnelLocal), echo: netip.AddrPortFrom(loop, tunnelLocal+1),
			proxies: func() []*lab.Process { return []*lab.Process{e.tunnel.cli, e.tunnel.srv} }},
		PathHAProxy: {client: c.Pod("bclient"), drain: netip.AddrPortFrom(loop, haproxyLocal), echo: netip.AddrPortFrom(loop, haproxyLocal+1),
			proxies: func() []*lab.Process { return []*lab.Process{e.haproxy.cli, e.haproxy.srv} }},
	}
	for _, name := range e.opts.Paths {
		p, ok := all[name]
		if !ok {
			return fmt.Errorf("unknown path %q (have %s)", name, strings.Join(allPaths, ", "))
		}
		p.name = name
		e.paths[name] = p
		if err := e.agentsFor(p); err != nil {
			return fmt.Errorf("agents for %s: %w", name, err)
		}
		// Warm up: the first connection sets up the HBONE pool and the tunnel's TLS session cache.
		if _, err := e.client(p, "load", "-c", p.echo.String(), "-conns", "1", "-d", "200ms"); err != nil {
			return fmt.Errorf("warm up %s: %w", name, err)
		}
	}
	return nil
}

// client runs labapp in the path's client pod to completion and decodes its JSON line.
func (e *env) client(p *path, args ...string) (map[string]any, error) {
	proc, err := p.client.Start(e.appBin, args...)
	if err != nil {
		return nil, err
	}
	if err := proc.Wait(); err != nil {
		return nil, err
	}
	return lastJSON(proc.Output())
}

func lastJSON(out string) (map[string]any, error) {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var m map[string]any
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &m); err != nil {
		return nil, fmt.Errorf("labapp output %q: %w", out, err)
	}
	return m, nil
}

// proxyCPU returns the CPU time of each of the path's proxies.
func proxyCPU(p *path) ([]time.Duration, error) {
	if p.proxies == nil {
		return nil, nil
	}
	var out []time.Duration
	for _, proc := range p.proxies() {
		d, err := procCPU(proc.PID())
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// cpuDelta adds proxy_cpu_s (all proxies) and proxy_cpu_max_s (the busiest one) to m.
func cpuDelta(m map[string]float64, before, after []time.Duration) (sum, busiest float64) {
	for i := range before {
		d := (after[i] - before[i]).Seconds()
		sum += d
		busiest = max(busiest, d)
	}
	m["proxy_cpu_s"], m["proxy_cpu_max_s"] = sum, busiest
	return sum, busiest
}

// measure runs one scenario once on one path.
func (e *env) measure(sc string, p *path) (map[string]float64, error) {
	if sc == ScenarioIdle {
		return e.idle(p)
	}
	var args []string
	switch sc {
	case ScenarioBulk1:
		args = []string{"bulk", "-c", p.drain.String(), "-streams", "1", "-d", e.opts.Bulk.String()}
	case ScenarioBulk8:
		args = []string{"bulk", "-c", p.drain.String(), "-streams", fmt.Sprint(e.opts.Streams), "-d", e.opts.Bulk.String()}
	case ScenarioRR:
		args = []string{"load", "-c", p.echo.String(), "-conns", fmt.Sprint(e.opts.LoadConns), "-rate", fmt.Sprint(e.opts.Rate), "-d", e.opts.Load.String()}
	case ScenarioCPU:
		args = []string{"load", "-c", p.echo.String(), "-conns", fmt.Sprint(e.opts.LoadConns), "-d", e.opts.Short.String()}
	case ScenarioConns:
		args = []string{"cps", "-c", p.echo.String(), "-conns", fmt.Sprint(e.opts.Workers), "-d", e.opts.Short.String()}
	default:
		return nil, fmt.Errorf("unknown scenario %q (have %s)", sc, strings.Join(Scenarios, ", "))
	}
	before, err := proxyCPU(p)
	if err != nil {
		return nil, err
	}
	out, err := e.client(p, args...)
	if err != nil {
		return nil, err
	}
	after, err := proxyCPU(p)
	if err != nil {
		return nil, err
	}
	m := map[string]float64{}
	for k, v := range out {
		if f, ok := v.(float64); ok {
			m[k] = f
		}
	}
	secs := m["seconds"]
	sum, busiest := cpuDelta(m, before, after)
	switch sc {
	case ScenarioBulk1, ScenarioBulk8:
		m["gbit_per_s"] = m["bytes_per_s"] * 8 / 1e9
		if p.proxies != nil && m["bytes"] > 0 {
			m["proxy_cpu_s_per_gib"] = sum / (m["bytes"] / (1 << 30))
		}
	case ScenarioRR, ScenarioCPU:
		if p.proxies != nil {
			m["proxy_vcpu"], m["proxy_vcpu_max"] = sum/secs, busiest/secs
			m["proxy_cpu_s_per_1k_req"] = sum / m["requests"] * 1000
			m["proxy_cpu_s_per_1k_req_max"] = busiest / m["requests"] * 1000
		}
	case ScenarioConns:
		if m["failed"] > 0 {
			return nil, fmt.Errorf("%v of %v connections failed: %v", m["failed"], m["connections"], out["error"])
		}
		if p.proxies != nil {
			m["proxy_vcpu"], m["proxy_vcpu_max"] = sum/secs, busiest/secs
			if busiest > 0 {
				m["conns_per_proxy_vcpu"] = m["connections"] / sum
				m["conns_per_busiest_proxy_vcpu"] = m["connections"] / busiest
			}
		}
	}
	return m, nil
}

// idle restarts the path's proxies, then holds n connections through them
// and reads their RSS before and while holding.
func (e *env) idle(p *path) (map[string]float64, error) {
	n := e.opts.Idle
	if p.name == PathWarrenSame || p.name == PathWarrenSameFast || p.name == PathWarrenSameHBONE {
		// One agent holds both ends of each connection: two descriptors.
		n = min(n, (e.noFile-2000)/2)
	}
	switch p.name {
	case PathTunnel:
		n = e.opts.TunnelIdle
		e.tunnel.stop()
		if err := e.tunnel.start([]int{drainPort, echoPort}); err != nil {
			return nil, err
		}
	case PathHAProxy:
		n = e.haproxyIdle()
		e.haproxy.stop()
		if err := e.haproxy.start([]int{drainPort, echoPort}); err != nil {
			return nil, err
		}
	default:
		if err := e.restartAgents(); err != nil {
			return nil, err
		}
	}
	// One exchange sets up the path (HBONE pool, TLS session) as in steady state.
	if _, err := e.client(p, "load", "-c", p.echo.String(), "-conns", "1", "-d", "100ms"); err != nil {
		return nil, fmt.Errorf("warm up: %w", err)
	}
	time.Sleep(500 * time.Millisecond)
	rss := func() ([]int64, error) {
		var out []int64
		for _, proc := range p.proxies() {
			v, err := procRSS(proc.PID())
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
		return out, nil
	}
	before, err := rss()
	if err != nil {
		return nil, err
	}
	hold, err := p.client.Start(e.appBin, "hold", "-c", p.echo.String(), "-n", fmt.Sprint(n), "-hold", "3m")
	if err != nil {
		return nil, err
	}
	defer hold.Stop()
	if err := hold.WaitOutput(`"holding"`, 3*time.Minute); err != nil {
		return nil, err
	}
	out, err := lastJSON(hold.Output())
	if err != nil {
		return nil, err
	}
	time.Sleep(time.Second) // let the proxies finish their per-connection setup
	during, err := rss()
	if err != nil {
		return nil, err
	}
	m := map[string]float64{"connections": float64(n), "open_seconds": out["seconds"].(float64), "rlimit_nofile": float64(e.noFile)}
	var sumB, sumD, maxB, maxD int64
	for i := range before {
		d := during[i] - before[i]
		sumB, sumD = sumB+before[i], sumD+during[i]
		maxB, maxD = max(maxB, before[i]), max(maxD, d)
	}
	m["proxy_rss_before_bytes"], m["proxy_rss_open_bytes"] = float64(sumB), float64(sumD)
	m["proxy_rss_before_max_bytes"] = float64(maxB)
	m["bytes_per_conn"] = float64(sumD-sumB) / float64(n)
	m["bytes_per_conn_max"] = float64(maxD) / float64(n)
	var threads int
	for _, proc := range p.proxies() {
		threads += procThreads(proc.PID())
	}
	m["proxy_threads_open"] = float64(threads)
	return m, nil
}

// haproxyIdle is how many connections scenario 5 holds through the HAProxy
// pair: as many as through warren (it is event-driven like the agents),
// but each end keeps two descriptors per connection, so at most what
// RLIMIT_NOFILE allows.
func (e *env) haproxyIdle() int {
	return min(e.opts.Idle, (e.noFile-2000)/2)
}

// agentEnv sets opts.AgentEnv in this process's environment, which the
// agents started next inherit, and returns the function that restores it.
func (e *env) agentEnv() (restore func()) {
	var undo []func()
	for _, kv := range e.opts.AgentEnv {
		k, v, _ := strings.Cut(kv, "=")
		old, had := os.LookupEnv(k)
		os.Setenv(k, v)
		undo = append(undo, func() {
			if had {
				os.Setenv(k, old)
			} else {
				os.Unsetenv(k)
			}
		})
	}
	return func() {
		for _, u := range undo {
			u()
		}
	}
}

// restartAgents replaces both agents with fresh processes, started with
// the same flags.
func (e *env) restartAgents() error {
	defer e.agentEnv()()
	for _, n := range e.lab.Nodes() {
		old := e.mesh.Agents[n.Name()]
		if err := old.Stop(); err != nil {
			return err
		}
		if _, err := e.mesh.StartAgent(n, e.agentArgs); err != nil {
			return err
		}
	}
	return nil
}

// agentsFor restarts the agents with p's flags when p runs through them and
// they run with others, and warms p up again.
func (e *env) agentsFor(p *path) error {
	if p.proxies == nil || p.name == PathTunnel || p.name == PathHAProxy || slices.Equal(p.agentArgs, e.agentArgs) {
		return nil
	}
	e.agentArgs = p.agentArgs
	if err := e.restartAgents(); err != nil {
		return err
	}
	if _, err := e.client(p, "load", "-c", p.echo.String(), "-conns", "1", "-d", "200ms"); err != nil {
		return fmt.Errorf("warm up %s: %w", p.name, err)
	}
	return nil
}

// vethTCP measures one plain TCP stream from node1 to node2 over the underlay.
func (e *env) vethTCP(d time.Duration) (float64, error) {
	n1, n2 := e.lab.Node("node1"), e.lab.Node("node2")
	addr := netip.AddrPortFrom(n2.IPv4(), 9100)
	srv, err := n2.Start(e.appBin, "drain", "-l", addr.String())
	if err != nil {
		return 0, err
	}
	defer srv.Stop()
	if err := srv.WaitOutput("listening", 10*time.Second); err != nil {
		return 0, err
	}
	cli, err := n1.Start(e.appBin, "bulk", "-c", addr.String(), "-streams", "1", "-d", d.String())
	if err != nil {
		return 0, err
	}
	if err := cli.Wait(); err != nil {
		return 0, err
	}
	m, err := lastJSON(cli.Output())
	if err != nil {
		return 0, err
	}
	return m["bytes_per_s"].(float64), nil
}

// profile runs the warren path once more per scenario while the agents
// profile themselves, and writes the profiles into dir.
func (e *env) profile(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	p := e.paths[PathWarren]
	if p == nil {
		return errors.New("profiling needs the warren path")
	}
	for _, sc := range []string{ScenarioBulk1, ScenarioRR, ScenarioConns, ScenarioCPU} {
		d := e.opts.Bulk
		switch sc {
		case ScenarioRR:
			d = e.opts.Load
		case ScenarioConns, ScenarioCPU:
			d = e.opts.Short
		}
		secs := max(1, int(d.Seconds())-1)
		errc := make(chan error, 2)
		for _, n := range e.lab.Nodes() {
			go func() {
				errc <- fetch(n, fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), filepath.Join(dir, fmt.Sprintf("%s-%s.cpu.pprof", sc, n.Name())))
			}()
		}
		if _, err := e.measure(sc, p); err != nil {
			return err
		}
		if err := errors.Join(<-errc, <-errc); err != nil {
			return err
		}
	}
	// Heap while holding idle connections.
	if err := e.restartAgents(); err != nil {
		return err
	}
	hold, err := p.client.Start(e.appBin, "hold", "-c", p.echo.String(), "-n", fmt.Sprint(e.opts.Idle), "-hold", "3m")
	if err != nil {
		return err
	}
	defer hold.Stop()
	if err := hold.WaitOutput(`"holding"`, 3*time.Minute); err != nil {
		return err
	}
	for _, n := range e.lab.Nodes() {
		for _, prof := range []string{"heap", "goroutine"} {
			if err := fetch(n, "/debug/pprof/"+prof, filepath.Join(dir, fmt.Sprintf("idle-%s.%s.pprof", n.Name(), prof))); err != nil {
				return err
			}
		}
	}
	return nil
}

// fetch GETs path from the admin API of n's agent into file.
func fetch(n *lab.Node, path, file string) error {
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
		err = n.Do(func() error {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 2 * time.Minute}).Get("http://127.0.0.1:15000" + path)
	if err != nil {
		return fmt.Errorf("fetch %s from %s: %w", path, n.Name(), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("fetch %s from %s: %d %s", path, n.Name(), resp.StatusCode, b)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

func machine(stunnelBin, haproxyBin string) Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), Stunnel: stunnelVersion(stunnelBin), HAProxy: haproxyVersion(haproxyBin)}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				m.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		m.MemTotal = strings.Join(strings.Fields(strings.Split(string(b), "\n")[0])[1:], " ")
	}
	return m
}

func optionsJSON(o Options) map[string]any {
	return map[string]any{"runs": o.Runs, "bulk": o.Bulk.String(), "load": o.Load.String(), "short": o.Short.String(),
		"rate": o.Rate, "load_conns": o.LoadConns, "streams": o.Streams, "workers": o.Workers,
		"idle": o.Idle, "tunnel_idle": o.TunnelIdle, "scenarios": o.Scenarios, "paths": o.Paths, "agent_env": o.AgentEnv}
}

// medians returns, for every metric in runs, its median.
func medians(runs []map[string]float64) map[string]float64 {
	vals := map[string][]float64{}
	for _, r := range runs {
		for k, v := range r {
			vals[k] = append(vals[k], v)
		}
	}
	out := map[string]float64{}
	for k, v := range vals {
		slices.Sort(v)
		if len(v)%2 == 1 {
			out[k] = v[len(v)/2]
		} else {
			out[k] = (v[len(v)/2-1] + v[len(v)/2]) / 2
		}
	}
	return out
}

// summary is a progress line's view of one measurement.
func summary(sc string, m map[string]float64) string {
	switch sc {
	case ScenarioBulk1, ScenarioBulk8:
		return fmt.Sprintf("%.2f Gbit/s  proxy cpu %.2fs", m["gbit_per_s"], m["proxy_cpu_s"])
	case ScenarioRR, ScenarioCPU:
		return fmt.Sprintf("%.0f req/s  p50 %.0fµs p90 %.0fµs p99 %.0fµs  proxy %.3f vCPU", m["rps"], m["p50_us"], m["p90_us"], m["p99_us"], m["proxy_vcpu"])
	case ScenarioConns:
		return fmt.Sprintf("%.0f conn/s  proxy %.2f vCPU", m["conns_per_s"], m["proxy_vcpu"])
	case ScenarioIdle:
		return fmt.Sprintf("%.0f conns  rss %.1f → %.1f MiB  %.0f B/conn", m["connections"], m["proxy_rss_before_bytes"]/(1<<20), m["proxy_rss_open_bytes"]/(1<<20), m["bytes_per_conn"])
	}
	return ""
}
