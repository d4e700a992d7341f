package bench

import (
	"fmt"
	"math"
	"slices"
	"strings"
)

// Target is one of issue 15's targets read from the medians. Targets are
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

// bestPair returns the better of the tunnel pairs' medians for metric:
// the larger when higher is better, else the smaller; NaN if neither ran.
func (r *Report) bestPair(scenario, metric string, higher bool) float64 {
	best := math.NaN()
	for _, p := range pairPaths {
		v := r.median(scenario, p, metric)
		if math.IsNaN(v) || v == 0 {
			continue
		}
		if math.IsNaN(best) || higher && v > best || !higher && v < best {
			best = v
		}
	}
	return best
}

// evaluate reads issue 15's targets from the report's medians. Ratios
// against a tunnel pair take the better of the stunnel and HAProxy pairs.
func evaluate(r *Report) []Target {
	rps := r.median(ScenarioRR, PathWarren, "rps") / 1000
	ts := []Target{
		{Name: "single stream, warren ÷ best tunnel pair", Value: r.median(ScenarioBulk1, PathWarren, "gbit_per_s") / r.bestPair(ScenarioBulk1, "gbit_per_s", true), Limit: 1.2, AtLeast: true, Unit: "ratio"},
		{Name: "8 streams, warren ÷ best tunnel pair", Value: r.median(ScenarioBulk8, PathWarren, "gbit_per_s") / r.bestPair(ScenarioBulk8, "gbit_per_s", true), Limit: 1.2, AtLeast: true, Unit: "ratio"},
		{Name: "proxy CPU-s per GiB, warren ÷ best tunnel pair", Value: r.median(ScenarioBulk1, PathWarren, "proxy_cpu_s_per_gib") / r.bestPair(ScenarioBulk1, "proxy_cpu_s_per_gib", false), Limit: 0.8, Unit: "ratio"},
		{Name: "1 KiB rr, proxy CPU per 1,000 req/s (busiest agent)", Value: r.median(ScenarioRR, PathWarren, "proxy_vcpu_max") / rps, Limit: 0.06, Unit: "vCPU"},
		{Name: "added p99 at 1,000 req/s, warren − direct", Value: (r.median(ScenarioRR, PathWarren, "p99_us") - r.median(ScenarioRR, PathDirect, "p99_us")) / 1000, Limit: 0.15, Unit: "ms"},
		{Name: "new connections per busiest-agent vCPU", Value: r.median(ScenarioConns, PathWarren, "conns_per_busiest_proxy_vcpu"), Limit: 8000, AtLeast: true, Unit: "conn/s"},
		{Name: "same node, single stream, warren ÷ direct", Value: r.median(ScenarioBulk1, PathWarrenSame, "gbit_per_s") / r.median(ScenarioBulk1, PathDirectSame, "gbit_per_s"), Limit: 0.6, AtLeast: true, Unit: "ratio"},
		{Name: "bytes per idle connection at 10,000 (busiest agent)", Value: r.median(ScenarioIdle, PathWarren, "bytes_per_conn_max") / 1024, Limit: 20, Unit: "KiB"},
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
	higher                  bool // a larger value is better (throughput, rates)
}

var rows = []row{
	{ScenarioBulk1, "gbit_per_s", "(1) single stream, Gbit/s", 1, "%.2f", true},
	{ScenarioBulk8, "gbit_per_s", "(2) 8 streams, Gbit/s", 1, "%.2f", true},
	{ScenarioBulk1, "proxy_cpu_s_per_gib", "(1) proxy CPU-s per GiB", 1, "%.2f", false},
	{ScenarioRR, "p50_us", "(3) 1 KiB rr @1,000/s p50, µs", 1, "%.0f", false},
	{ScenarioRR, "p90_us", "(3) p90, µs", 1, "%.0f", false},
	{ScenarioRR, "p99_us", "(3) p99, µs", 1, "%.0f", false},
	{ScenarioRR, "proxy_vcpu", "(3) proxy vCPU at 1,000 req/s", 1, "%.3f", false},
	{ScenarioConns, "conns_per_s", "(4) new connections/s", 1, "%.0f", true},
	{ScenarioConns, "conns_per_proxy_vcpu", "(4) new connections per proxy vCPU", 1, "%.0f", true},
	{ScenarioIdle, "proxy_rss_before_bytes", "(5) proxy RSS before, MiB", 1.0 / (1 << 20), "%.1f", false},
	{ScenarioIdle, "bytes_per_conn", "(5) proxy bytes per idle connection", 1, "%.0f", false},
	{ScenarioCPU, "rps", "(6) 1 KiB rr flat out, req/s", 1, "%.0f", true},
	{ScenarioCPU, "proxy_cpu_s_per_1k_req", "(6) proxy CPU-s per 1,000 requests", 1, "%.4f", false},
}

// spread returns "min–max" of a metric over the runs of scenario on path.
func (r *Report) spread(scenario, path, metric string, scale float64, format string) string {
	res := r.Find(scenario, path)
	if res == nil {
		return "–"
	}
	var vals []float64
	for _, run := range res.Runs {
		if v, ok := run[metric]; ok {
			vals = append(vals, v*scale)
		}
	}
	if len(vals) < 2 {
		return "–"
	}
	return fmt.Sprintf(format+"–"+format, slices.Min(vals), slices.Max(vals))
}

// Markdown renders the ratio table, the spread of each figure over the
// runs, and the targets.
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
	if !r.Machine.Quiet {
		fmt.Fprintf(&b, "**Not a quiet-machine run: the 1-minute load was %.2f at the start (quiet means below %.2f).**\n\n", r.Machine.Load1Start, r.Machine.QuietLimit)
	}
	fmt.Fprintf(&b, "Medians of %v runs; proxy = both node agents (warren), both stunnel4 ends (stunnel pair) or both HAProxy ends (HAProxy pair); \"best pair\" is the better of the two pairs for each figure. ", r.Options.(map[string]any)["runs"])
	fmt.Fprintf(&b, "%s, %d vCPU, kernel %s, %s, %s, %s; load1 %.2f → %.2f (max %.2f).\n\n",
		r.Machine.CPU, r.Machine.CPUs, r.Machine.Kernel, r.Machine.Go, r.Machine.Stunnel, r.Machine.HAProxy, r.Machine.Load1Start, r.Machine.Load1End, r.Machine.Load1Max)
	b.WriteString("| scenario | direct | warren | warren ÷ direct | stunnel pair | HAProxy pair | warren ÷ best pair | direct, 1 node | warren, 1 node | ÷ direct, 1 node |\n")
	b.WriteString("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	var shown []row
	for _, rw := range rows {
		if !slices.ContainsFunc(r.Results, func(res *Result) bool { return res.Scenario == rw.scenario }) {
			continue
		}
		shown = append(shown, rw)
		v := func(p string) float64 { return r.median(rw.scenario, p, rw.metric) * rw.scale }
		d, w, t, h, ds, ws := v(PathDirect), v(PathWarren), v(PathTunnel), v(PathHAProxy), v(PathDirectSame), v(PathWarrenSame)
		best := r.bestPair(rw.scenario, rw.metric, rw.higher) * rw.scale
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", rw.label,
			cell(d, rw.format), cell(w, rw.format), ratio(w, d), cell(t, rw.format), cell(h, rw.format), ratio(w, best),
			cell(ds, rw.format), cell(ws, rw.format), ratio(ws, ds))
	}
	b.WriteString("\nSpread (min–max over the runs):\n\n| scenario | direct | warren | stunnel pair | HAProxy pair | direct, 1 node | warren, 1 node |\n|---|--:|--:|--:|--:|--:|--:|\n")
	for _, rw := range shown {
		fmt.Fprintf(&b, "| %s |", rw.label)
		for _, p := range []string{PathDirect, PathWarren, PathTunnel, PathHAProxy, PathDirectSame, PathWarrenSame} {
			fmt.Fprintf(&b, " %s |", r.spread(rw.scenario, p, rw.metric, rw.scale, rw.format))
		}
		b.WriteString("\n")
	}
	if slices.ContainsFunc(r.Results, func(res *Result) bool { return slices.Contains(ExtraPaths, res.Path) }) {
		b.WriteString("\nSame node, agents restarted with `--same-node-fast-path` on (fast) or off (HBONE) before each measurement:\n\n")
		b.WriteString("| scenario | direct, 1 node | warren, 1 node | fast path | HBONE | fast ÷ HBONE | fast ÷ direct, 1 node | spread fast | spread HBONE |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|\n")
		for _, rw := range shown {
			v := func(p string) float64 { return r.median(rw.scenario, p, rw.metric) * rw.scale }
			ds, ws, f, h := v(PathDirectSame), v(PathWarrenSame), v(PathWarrenSameFast), v(PathWarrenSameHBONE)
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", rw.label, cell(ds, rw.format), cell(ws, rw.format),
				cell(f, rw.format), cell(h, rw.format), ratio(f, h), ratio(f, ds),
				r.spread(rw.scenario, PathWarrenSameFast, rw.metric, rw.scale, rw.format), r.spread(rw.scenario, PathWarrenSameHBONE, rw.metric, rw.scale, rw.format))
		}
	}
	var anon, file float64
	for n := range r.AgentRSSStart {
		anon, file = max(anon, float64(r.AgentRSSAnonStart[n])), max(file, float64(r.AgentRSSFileStart[n]))
	}
	fmt.Fprintf(&b, "\nAgent RSS after start (busiest agent): anonymous %.1f MiB, file-backed %.1f MiB.\n", anon/(1<<20), file/(1<<20))
	fmt.Fprintf(&b, "\nPhysical context: AES-128-GCM seal %.2f GB/s per core; crypto/tls 1.3 AES-128-GCM %.2f GB/s per CPU-second (both ends); plain TCP over the lab's veths %.2f Gbit/s (one stream).\n",
		r.Physical.AESGCMSealBytesPerS/1e9, r.Physical.TLSBytesPerCPUS/1e9, r.Physical.VethTCPBytesPerS*8/1e9)
	b.WriteString("\nTargets (issue 15), from the medians:\n\n| target | value | limit | met |\n|---|--:|--:|:-:|\n")
	for _, t := range r.Targets {
		op := "≤"
		if t.AtLeast {
			op = "≥"
		}
		met := "not met"
		switch {
		case t.Missing:
			met = "not measured"
		case t.Met:
			met = "met"
		}
		val := fmt.Sprintf("%.3g %s", t.Value, t.Unit)
		if t.Missing {
			val = "–"
		}
		fmt.Fprintf(&b, "| %s | %s | %s %g %s | %s |\n", t.Name, val, op, t.Limit, t.Unit, met)
	}
	return b.String()
}
