package bench

import (
	"fmt"
	"math"
	"slices"
	"strings"
)

// Target is one of issue 8's targets read from the medians. Targets are
// reported, never enforced.
type Target struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Limit float64 `json:"limit"`
	// AtLeast: the value must be >= Limit (else <=).
	AtLeast bool   `json:"at_least"`
	Unit    string `json:"unit"`
	Met     bool   `json:"met"`
	// Missing: the scenarios it needs did not run.
	Missing bool `json:"missing,omitempty"`
}

// median returns a metric's median for scenario on path, NaN if absent.
func (r *Report) median(scenario, path, metric string) float64 {
	res := r.Find(scenario, path)
	if res == nil {
		return math.NaN()
	}
	v, ok := res.Median[metric]
	if !ok {
		return math.NaN()
	}
	return v
}

// evaluate reads issue 8's targets from the report's medians.
func evaluate(r *Report) []Target {
	var agentStart float64
	for _, v := range r.AgentRSSStart {
		agentStart = max(agentStart, float64(v))
	}
	ts := []Target{
		{Name: "single stream: warren ÷ direct", Value: r.median(ScenarioBulk1, PathWarren, "gbit_per_s") / r.median(ScenarioBulk1, PathDirect, "gbit_per_s"), Limit: 0.40, AtLeast: true, Unit: "ratio"},
		{Name: "single stream: warren ÷ tunnel pair", Value: r.median(ScenarioBulk1, PathWarren, "gbit_per_s") / r.median(ScenarioBulk1, PathTunnel, "gbit_per_s"), Limit: 1.2, AtLeast: true, Unit: "ratio"},
		{Name: "added p99 at 1,000 req/s (warren − direct, across nodes)", Value: (r.median(ScenarioRR, PathWarren, "p99_us") - r.median(ScenarioRR, PathDirect, "p99_us")) / 1000, Limit: 0.10, Unit: "ms"},
		{Name: "added p99 at 1,000 req/s (one node)", Value: (r.median(ScenarioRR, PathWarrenSame, "p99_us") - r.median(ScenarioRR, PathDirectSame, "p99_us")) / 1000, Limit: 0.10, Unit: "ms"},
		{Name: "agent CPU per 1,000 req/s (busiest agent, across nodes)", Value: r.median(ScenarioRR, PathWarren, "proxy_vcpu_max") / (r.median(ScenarioRR, PathWarren, "rps") / 1000), Limit: 0.03, Unit: "vCPU"},
		{Name: "new connections per agent vCPU (busiest agent, across nodes)", Value: r.median(ScenarioConns, PathWarren, "conns_per_busiest_proxy_vcpu"), Limit: 5000, AtLeast: true, Unit: "conn/s"},
		{Name: "agent RSS idle (after start, 4 workloads)", Value: agentStart / (1 << 20), Limit: 20, Unit: "MiB"},
		{Name: "agent bytes per open connection (busiest agent, across nodes)", Value: r.median(ScenarioIdle, PathWarren, "bytes_per_conn_max") / 1024, Limit: 32, Unit: "KiB"},
	}
	for i := range ts {
		t := &ts[i]
		if math.IsNaN(t.Value) || math.IsInf(t.Value, 0) {
			t.Missing = true
			t.Value = 0
			continue
		}
		t.Met = t.Value <= t.Limit
		if t.AtLeast {
			t.Met = t.Value >= t.Limit
		}
	}
	return ts
}

// row is one line of the ratio table: a metric across the paths.
type row struct {
	scenario, metric, label string
	scale                   float64
	format                  string
}

var rows = []row{
	{ScenarioBulk1, "gbit_per_s", "(1) single stream, Gbit/s", 1, "%.2f"},
	{ScenarioBulk8, "gbit_per_s", "(2) 8 streams, Gbit/s", 1, "%.2f"},
	{ScenarioBulk1, "proxy_cpu_s_per_gib", "(1) proxy CPU-s per GiB", 1, "%.2f"},
	{ScenarioRR, "p50_us", "(3) 1 KiB rr @1,000/s p50, µs", 1, "%.0f"},
	{ScenarioRR, "p90_us", "(3) p90, µs", 1, "%.0f"},
	{ScenarioRR, "p99_us", "(3) p99, µs", 1, "%.0f"},
	{ScenarioRR, "proxy_vcpu", "(3) proxy vCPU at 1,000 req/s", 1, "%.3f"},
	{ScenarioConns, "conns_per_s", "(4) new connections/s", 1, "%.0f"},
	{ScenarioConns, "conns_per_proxy_vcpu", "(4) new connections per proxy vCPU", 1, "%.0f"},
	{ScenarioIdle, "proxy_rss_before_bytes", "(5) proxy RSS before, MiB", 1.0 / (1 << 20), "%.1f"},
	{ScenarioIdle, "bytes_per_conn", "(5) proxy bytes per idle connection", 1, "%.0f"},
	{ScenarioCPU, "rps", "(6) 1 KiB rr flat out, req/s", 1, "%.0f"},
	{ScenarioCPU, "proxy_cpu_s_per_1k_req", "(6) proxy CPU-s per 1,000 requests", 1, "%.4f"},
}

// Markdown renders the ratio table and the targets.
func Markdown(r *Report) string {
	var b strings.Builder
	cell := func(v float64, f string) string {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return "–"
		}
		return fmt.Sprintf(f, v)
	}
	ratio := func(a, b float64) string {
		if b == 0 || math.IsNaN(a) || math.IsNaN(b) || a == 0 {
			return "–"
		}
		return fmt.Sprintf("%.2f", a/b)
	}
	fmt.Fprintf(&b, "Medians of %v runs; proxy = both node agents (warren) or both stunnel4 ends (tunnel pair). ", r.Options.(map[string]any)["runs"])
	fmt.Fprintf(&b, "%s, %d vCPU, kernel %s, %s; load1 %.2f → %.2f (max %.2f).\n\n",
		r.Machine.CPU, r.Machine.CPUs, r.Machine.Kernel, r.Machine.Go, r.Machine.Load1Start, r.Machine.Load1End, r.Machine.Load1Max)
	b.WriteString("| scenario | direct | warren | warren ÷ direct | tunnel pair | warren ÷ tunnel | direct, 1 node | warren, 1 node | ÷ direct, 1 node |\n")
	b.WriteString("|---|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, rw := range rows {
		if !slices.ContainsFunc(r.Results, func(res *Result) bool { return res.Scenario == rw.scenario }) {
			continue
		}
		v := func(p string) float64 { return r.median(rw.scenario, p, rw.metric) * rw.scale }
		d, w, t, ds, ws := v(PathDirect), v(PathWarren), v(PathTunnel), v(PathDirectSame), v(PathWarrenSame)
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", rw.label,
			cell(d, rw.format), cell(w, rw.format), ratio(w, d), cell(t, rw.format), ratio(w, t),
			cell(ds, rw.format), cell(ws, rw.format), ratio(ws, ds))
	}
	var anon, file float64
	for n := range r.AgentRSSStart {
		anon, file = max(anon, float64(r.AgentRSSAnonStart[n])), max(file, float64(r.AgentRSSFileStart[n]))
	}
	fmt.Fprintf(&b, "\nAgent RSS after start (busiest agent): anonymous %.1f MiB, file-backed %.1f MiB.\n", anon/(1<<20), file/(1<<20))
	fmt.Fprintf(&b, "\nPhysical context: AES-128-GCM seal %.2f GB/s per core; crypto/tls 1.3 AES-128-GCM %.2f GB/s per CPU-second (both ends); plain TCP over the lab's veths %.2f Gbit/s (one stream).\n",
		r.Physical.AESGCMSealBytesPerS/1e9, r.Physical.TLSBytesPerCPUS/1e9, r.Physical.VethTCPBytesPerS*8/1e9)
	b.WriteString("\n| target | value | limit | met |\n|---|--:|--:|:-:|\n")
	for _, t := range r.Targets {
		op := "≤"
		if t.AtLeast {
			op = "≥"
		}
		met := "no"
		switch {
		case t.Missing:
			met = "not measured"
		case t.Met:
			met = "yes"
		}
		val := fmt.Sprintf("%.3g %s", t.Value, t.Unit)
		if t.Missing {
			val = "–"
		}
		fmt.Fprintf(&b, "| %s | %s | %s %g %s | %s |\n", t.Name, val, op, t.Limit, t.Unit, met)
	}
	return b.String()
}
